"""The planner: its probes against hand counts and real runs, its data profile against the real batches."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.config import Config
from tunelab.plan import planner
from tunelab.plan.probe import meta_model, probe, probe_loss

from test_causal_lm import chat_config, tiny_llama  # noqa: F401  (the module-scoped fixture)


@pytest.mark.unit
def test_probe_counts_a_hand_built_mlp_exactly():
    """Linear(8,16) -> GELU -> Linear(16,4) on 5 rows whose input needs no grad.
    Saved for backward: the input x (5x8), GELU's input (5x16), the second Linear's input (5x16),
    fp32: (40 + 80 + 80) * 4 = 800 bytes; weights are parameters, not activations.
    FLOPs (2mnk per matmul): forward 2*5*8*16 + 2*5*16*4 = 1920; backward: weight grads 1280 + 640,
    input grad of the second Linear 640, none for the first (x needs none) -> 4480."""
    with torch.device("meta"):
        mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    r = probe_loss(mlp, lambda m: m(torch.zeros(5, 8)).sum())
    assert r.saved_bytes == 800
    assert r.largest_saved_bytes == 320
    assert r.flops == 4480


@pytest.mark.unit
def test_frozen_first_layer_drops_its_weight_gradient_flops():
    """The same MLP with the first Linear frozen: nothing before the second Linear needs a gradient,
    so only its input (5x16 fp32 = 320 bytes) is saved, and backward is its weight gradient alone:
    forward 1920 + 640 = 2560 FLOPs."""
    with torch.device("meta"):
        mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    mlp[0].weight.requires_grad = mlp[0].bias.requires_grad = False
    r = probe_loss(mlp, lambda m: m(torch.zeros(5, 8)).sum())
    assert r.flops == 2560
    assert r.saved_bytes == 320


def _toy_cfg(toy, **train):
    raw = copy.deepcopy(toy["config"])
    raw["train"].update(train)
    return Config.model_validate(raw)


def _real_cost(model, batch, loss_fn):
    """Saved bytes and FLOPs of a real (allocated) forward + backward: the reference for the probe."""
    from torch.utils.flop_counter import FlopCounterMode

    params = {p.untyped_storage()._cdata for p in model.parameters()}
    saved = {}

    def pack(t):
        if t.untyped_storage()._cdata not in params:
            saved[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t

    model.train()
    with FlopCounterMode(display=False) as fc:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = loss_fn(model, batch)
        loss.backward()
    return sum(saved.values()), fc.get_total_flops()


@pytest.mark.parity
def test_probe_matches_a_real_forward_backward_of_tiny_bert(toy_classification):
    from tunelab.tasks.classification import classification_loss

    cfg = _toy_cfg(toy_classification)
    meta = meta_model(cfg, num_labels=2)
    r = probe(meta, "classification", rows=3, width=11)
    torch.manual_seed(0)
    from transformers import AutoModelForSequenceClassification

    real = AutoModelForSequenceClassification.from_pretrained(cfg.model.name, num_labels=2)
    batch = {"input_ids": torch.ones(3, 11, dtype=torch.long), "attention_mask": torch.ones(3, 11, dtype=torch.long),
             "labels": torch.zeros(3, dtype=torch.long)}
    saved, flops = _real_cost(real, batch, classification_loss)
    assert r.flops == flops
    assert abs(r.saved_bytes - saved) <= 0.02 * saved


@pytest.mark.unit
def test_fitted_costs_equal_a_direct_probe_at_other_shapes(toy_classification, tiny_llama, tmp_path):
    cfg = _toy_cfg(toy_classification)
    meta = meta_model(cfg, num_labels=2)
    coef = planner.fit_costs(meta, "classification", 24, packed=False, autocast_dtype=None)
    for rows, width in [(3, 13), (5, 24), (2, 7)]:
        direct = probe(meta, "classification", rows=rows, width=width)
        assert planner.shape_cost(coef["flops"], rows, width, 0) == pytest.approx(direct.flops, rel=1e-6)
        assert planner.shape_cost(coef["saved_bytes"], rows, width, 0) == pytest.approx(direct.saved_bytes, rel=0.02)
    # a causal LM with the vocabulary projection at the supervised positions only
    from tunelab.config import load_config

    chat = load_config(chat_config(tmp_path, str(tiny_llama)), [])
    lm = meta_model(chat, None)
    coef = planner.fit_costs(lm, "chat", 40, packed=True, autocast_dtype=None)
    for rows, width, sup in [(2, 33, 20), (1, 40, 5)]:
        direct = probe(lm, "chat", rows=rows, width=width, supervised=sup, packed=True)
        assert planner.shape_cost(coef["flops"], rows, width, sup) == pytest.approx(direct.flops, rel=1e-6)
        assert planner.shape_cost(coef["saved_bytes"], rows, width, sup) == pytest.approx(direct.saved_bytes, rel=0.05)


@pytest.mark.parity
def test_param_bytes_match_the_real_optimizer_state(toy_classification):
    """Weights, gradients and AdamW moments against the tensors a real step allocates."""
    from tunelab.run import setup

    cfg = _toy_cfg(toy_classification)
    r = setup(cfg)
    batch = r.task.train.collate(list(range(4)))
    loss, _ = r.task.loss_fn(r.model, batch)
    loss.backward()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in r.model.parameters() if p.grad is not None)
    r.optimizer.step()
    moments = sum(v.numel() * v.element_size() for st in r.optimizer.state.values()
                  for k, v in st.items() if k in ("exp_avg", "exp_avg_sq"))
    weights = sum(p.numel() * p.element_size() for p in r.model.parameters())
    pb = planner.param_bytes(meta_model(cfg, 2), cfg)
    assert (pb["weights"], pb["gradients"], pb["optimizer"]) == (weights, grads, moments)
    assert pb["trainable_params"] == r.trainable and pb["total_params"] == r.total


@pytest.mark.parity
def test_lora_and_qlora_param_bytes(toy_classification):
    raw = copy.deepcopy(toy_classification["config"])
    full = planner.param_bytes(meta_model(Config.model_validate(raw), 2), Config.model_validate(raw))
    raw["method"] = "lora"
    lora_cfg = Config.model_validate(raw)
    lora = planner.param_bytes(meta_model(lora_cfg, 2), lora_cfg)
    base = meta_model(Config.model_validate(toy_classification["config"]), 2)
    linear = [m for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and not n.startswith("classifier")]
    head = sum(p.numel() for p in base.classifier.parameters())
    # every linear layer but the head carries r x (in + out) (the BERT-like default targets)
    assert lora["trainable_params"] == sum(8 * (m.in_features + m.out_features) for m in linear) + head
    assert lora["trainable_params"] < full["trainable_params"]
    assert lora["optimizer"] == 8 * lora["trainable_params"]
    raw["method"] = "qlora"
    q_cfg = Config.model_validate(raw)
    q = planner.param_bytes(meta_model(q_cfg, 2), q_cfg)
    assert q["trainable_params"] == lora["trainable_params"]
    # against the real 4-bit model bitsandbytes builds: packed codes + absmax (+ nested absmax)
    from tunelab.run import setup

    real = 0
    for p in setup(q_cfg).model.parameters():
        real += p.numel() * p.element_size()
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            real += qs.absmax.numel() * qs.absmax.element_size()
            if qs.nested:
                real += qs.state2.absmax.numel() * qs.state2.absmax.element_size()
    assert q["weights"] == pytest.approx(real, rel=0.01)
    assert q["weights"] < 0.8 * lora["weights"]
    # the estimate stores the meta model's frozen Linear weights as the run does (lora.base_dtype, bf16
    # autocast): the ones QLoRA holds in 4 bits are counted once, at 4 bits, either way
    from tunelab.run import store_frozen_base

    stored = meta_model(q_cfg, 2)
    store_frozen_base(q_cfg, stored, "bf16", quiet=True)
    # only the head's frozen original (peft's modules_to_save), never 4-bit, drops from 4 to 2 bytes a value
    head_copy = sum(p.numel() for n, p in stored.named_parameters() if p.dtype == torch.bfloat16 and "classifier" in n)
    assert head_copy == 64
    assert planner.param_bytes(stored, q_cfg)["weights"] == q["weights"] - 2 * head_copy


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parity
def test_data_profile_matches_the_collated_batches(tiny_llama, tmp_path, packing):
    """Rows x width of every micro-batch and its supervised tokens, against the real collate."""
    from tunelab.config import load_config
    from tunelab.data.batching import epoch_batches
    from tunelab.compose import setup_task

    cfg = load_config(chat_config(tmp_path, str(tiny_llama)), [f"data.packing={str(packing).lower()}"])
    prof = planner.data_profile(cfg)
    task = setup_task(cfg)
    batches = epoch_batches(task.train.lengths, cfg.train.batch_size, seed=cfg.train.seed, epoch=0)
    real = []
    for idx in batches:
        b = task.train.collate(idx)
        real.append((b["input_ids"].shape[0], b["input_ids"].shape[1], int((b["labels"][:, 1:] != -100).sum())))
    assert prof["shapes"] == real
    assert prof["packed"] is packing


@pytest.mark.e2e
def test_planned_steps_equal_a_real_run_and_timing_is_measured(toy_classification, tmp_path):
    """`tunelab plan --json` on the toy config: its step and evaluation counts are those the real
    run then takes, the time comes from measured steps, and a gradient-checkpointing what-if
    lowers the activation memory."""
    from tunelab.run import run_training

    raw = copy.deepcopy(toy_classification["config"])
    raw["train"].update({"eval_every": 3})
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    res = CliRunner().invoke(app, ["plan", str(path), "--json", "--measure-steps", "2", "--price-per-hour", "3.6"])
    assert res.exit_code == 0, res.output
    p = json.loads(res.stdout.strip().splitlines()[-1])
    summary = run_training(Config.model_validate(raw), tmp_path / "run", show_progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert p["steps"]["total"] == summary["total_steps"] == 16
    assert p["steps"]["evaluations"] == sum(1 for r in rows if "eval_accuracy" in r)
    t = p["time"]
    assert t["measured_steps"] == 2 and t["measured_seconds"] > 0
    assert t["train_seconds"] == pytest.approx(p["flops"]["train_total"] / t["achieved_flops_per_second"], rel=0.01, abs=1e-3)
    assert p["cost"]["total"] == pytest.approx(3.6 * t["total_seconds"] / 3600, abs=1e-4)
    mem = p["memory_mb"]
    from tunelab.plan.report import COMPONENTS

    assert mem["peak_analytic"] == pytest.approx(sum(mem[k] for k in COMPONENTS), abs=0.5)
    assert mem["peak"] >= mem["peak_measured_steps"] > mem["runtime"]
    assert p["fits"] is True
    assert {s["change"] for s in p["suggestions"]} >= {"train.gradient_checkpointing=true", "method=lora"}


@pytest.mark.unit
def test_gradient_checkpointing_keeps_fewer_activations_but_recomputes(toy_classification):
    """The what-if the planner offers: checkpointing saves only block inputs (fewer saved bytes),
    backward recomputes each block (more FLOPs), and one block's activations come back as transient."""
    cfg = _toy_cfg(toy_classification)
    gc = Config.model_validate({**copy.deepcopy(toy_classification["config"]),
                                "train": {**toy_classification["config"]["train"], "gradient_checkpointing": True}})
    prof = planner.data_profile(cfg)
    plain, ckpt = planner.estimate(cfg, prof, 0), planner.estimate(gc, prof, 0)
    assert ckpt["memory"]["activations"] < plain["memory"]["activations"]
    assert ckpt["flops_per_epoch"] > plain["flops_per_epoch"]
    assert ckpt["memory"]["transient"] > plain["memory"]["transient"]


@pytest.mark.e2e
def test_plan_bad_config_is_one_line_exit_2(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("task: classification\ndata:\n  train: missing.jsonl\ntrain:\n  batch_size: zero\n", encoding="utf-8")
    res = CliRunner().invoke(app, ["plan", str(path), "--json"])
    assert res.exit_code == 2
    assert "batch_size" in res.output and "Traceback" not in res.output


@pytest.mark.parity
def test_plan_for_two_processes_matches_the_ddp_setup(toy_classification):
    """--nproc 2: the steps are those the DDP setup computes (a step takes 2 x grad_accum
    micro-batches), DDP's gradient buckets join the per-process memory, and on the CPU the two
    processes must fit together."""
    from tunelab.run import setup

    raw = copy.deepcopy(toy_classification["config"])
    raw["train"].update({"grad_accum": 3, "epochs": 3})
    cfg = Config.model_validate(raw)
    one = planner.make_plan(cfg, suggestions=False)
    two = planner.make_plan(cfg, suggestions=False, nproc=2)
    assert two["steps"]["total"] == setup(cfg, world_size=2).settings.total_steps
    assert one["steps"]["total"] == setup(cfg).settings.total_steps
    assert two["steps"]["total"] < one["steps"]["total"]
    mem1, mem2 = one["memory_mb"], two["memory_mb"]
    assert mem2["ddp_buckets"] == mem1["gradients"] and "ddp_buckets" not in mem1
    # (the runtime baseline is this test process's RSS, taken at each call: compare without it)
    assert mem2["peak"] - mem2["runtime"] == pytest.approx(mem1["peak"] - mem1["runtime"] + mem2["ddp_buckets"], abs=0.2)
    assert two["processes"] == 2


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parity
def test_the_probe_plans_the_causal_lm_switches_as_the_formula_counts_them(tiny_llama, tmp_path, packing):
    """`tunelab plan CONFIG` probes chat models with the run's switches (probe.Speed): the loss in chunks
    and the norms recomputed keep fewer activations, by what plan.memory counts for them at the
    largest micro-batch (the norms: 4 bytes x tokens x hidden each, 2 per layer and the final one; the
    loss: the fp32 log-softmax and the head's input replaced by the gradients the chunked loss keeps),
    and the planned peak goes down."""
    from tunelab.config import load_config
    from tunelab.plan import memory

    off = ["train.loss_chunk_tokens=0", "train.recompute_norms=false", f"data.packing={str(packing).lower()}"]
    plain = load_config(chat_config(tmp_path, str(tiny_llama)), off)
    chunk = load_config(chat_config(tmp_path, str(tiny_llama)), off[1:] + ["train.loss_chunk_tokens=16"])
    norms = load_config(chat_config(tmp_path, str(tiny_llama)), off[:1] + off[2:])
    assert norms.train.recompute_norms and chunk.train.loss_chunk_tokens == 16  # the switches' own defaults differ
    profile = planner.data_profile(plain)
    est = {k: planner.estimate(c, profile, runtime=0) for k, c in (("plain", plain), ("chunk", chunk), ("norms", norms))}
    rows, width, sup = est["plain"]["largest_micro_batch"].values()
    head = est["plain"]["model"].get_output_embeddings()
    vocab, hidden, layers = head.out_features, head.in_features, 2
    act = {k: e["memory"]["activations"] for k, e in est.items()}
    lb = memory.loss_bytes
    chunk_saves = (lb(sup, vocab, hidden, act_bytes=4)["saved"] + 4 * sup * hidden  # the head's fp32 input
                   + 8 * sup  # and cross-entropy's int64 targets
                   - lb(sup, vocab, hidden, act_bytes=4, hidden_bytes=4, chunk=16)["saved"])
    norms_save = (2 * layers + 1) * 4 * rows * width * hidden
    assert chunk_saves > 0 and norms_save > 0
    assert act["plain"] - act["chunk"] == pytest.approx(chunk_saves, rel=0.05)
    assert act["plain"] - act["norms"] == pytest.approx(norms_save, rel=0.05)
    assert est["chunk"]["memory"]["peak"] < est["plain"]["memory"]["peak"]
    assert est["norms"]["memory"]["peak"] < est["plain"]["memory"]["peak"]
