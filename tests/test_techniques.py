"""Issue 4 techniques, each against a reference computed independently in the test."""

import copy

import pytest

from conftest import stop_after
import torch
from transformers import BertConfig, BertForSequenceClassification

from tunelab.config import Config
from tunelab.models.adapt import apply_method, freeze
from tunelab.models.load import count_params
from tunelab.run import run_training
from tunelab.train.optim import build_optimizer, param_groups
from tunelab.train.regularizers import (Mixout, apply_mixout, estimate_fisher, ewc_penalty, l2sp_penalty,
                                        make_penalty, remove_mixout, anchored_params, snapshot)
from tunelab.train.unfreeze import GradualUnfreezer, set_trainable_top


def bert(layers=3):
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=layers,
                                                    num_attention_heads=2, intermediate_size=32, num_labels=2))


def step(model, opt):
    x = torch.randint(0, 50, (4, 6))
    out = model(input_ids=x, labels=torch.tensor([0, 1, 0, 1]))
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


# ------------------------------------------------------------------ freezing


@pytest.mark.unit
def test_freeze_embeddings_and_first_block_no_grad_no_state():
    m = bert()
    freeze(m, embeddings=True, blocks=1)
    opt = build_optimizer(param_groups(m, lr=1e-3, weight_decay=0.01))
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    step(m, opt)
    frozen = [n for n in before if n.startswith("bert.embeddings.") or n.startswith("bert.encoder.layer.0.")]
    assert frozen
    for n, p in m.named_parameters():
        if n in frozen:
            assert not p.requires_grad and p.grad is None and p not in opt.state
            assert torch.equal(p, before[n]), n
    assert not torch.equal(m.bert.encoder.layer[1].output.dense.weight, before["bert.encoder.layer.1.output.dense.weight"])
    trainable, total = count_params(m)
    by_hand = sum(p.numel() for n, p in m.named_parameters() if n not in frozen)
    assert trainable == by_hand and total == sum(p.numel() for p in m.parameters())


@pytest.mark.unit
def test_freeze_all_but_head():
    m = bert()
    freeze(m, all_but_head=True)
    assert [n for n, p in m.named_parameters() if p.requires_grad] == ["classifier.weight", "classifier.bias"]


@pytest.mark.e2e
def test_feature_extraction_trains_only_the_head(toy_classification, tmp_path):
    raw = copy.deepcopy(toy_classification["config"])
    raw["method"] = "feature_extraction"
    summary = run_training(Config.model_validate(raw), tmp_path / "run", show_progress=False)
    head = 32 * 2 + 2  # classifier weight + bias of the tiny BERT (hidden 32, 2 labels)
    assert summary["trainable_params"] == head
    assert summary["total_params"] > 10 * head


# ------------------------------------------------------------------ L2-SP, EWC, Mixout


@pytest.mark.unit
def test_l2sp_and_ewc_match_their_formulas():
    m = bert()
    params = anchored_params(m)
    anchor = snapshot(params)
    assert "classifier.weight" not in params  # the new head has no pre-trained value
    with torch.no_grad():
        for p in params.values():
            p.add_(0.1 * torch.randn_like(p))
    by_hand = sum(float(((p.detach() - anchor[n]) ** 2).sum()) for n, p in params.items())
    assert l2sp_penalty(params, anchor, 0.3).item() == pytest.approx(0.15 * by_hand, rel=1e-5)
    fisher = {n: torch.rand_like(p) for n, p in params.items()}
    by_hand = sum(float((fisher[n] * (p.detach() - anchor[n]) ** 2).sum()) for n, p in params.items())
    assert ewc_penalty(params, anchor, fisher, 2.0).item() == pytest.approx(by_hand, rel=1e-5)


@pytest.mark.unit
def test_fisher_is_mean_squared_gradient():
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 1, bias=False)
    batches = [{"x": torch.randn(4, 3), "y": torch.randn(4)} for _ in range(3)]

    def loss_fn(model, b):
        return ((model(b["x"]).squeeze(-1) - b["y"]) ** 2).sum(), len(b["y"])

    fisher = estimate_fisher(lin, {"weight": lin.weight}, batches, loss_fn)
    w = lin.weight.detach()
    expected = torch.zeros_like(w)
    for b in batches:  # per example: d/dw (x_i w - y_i)^2 = 2 (x_i w - y_i) x_i (the mean over 12 examples)
        resid = b["x"] @ w.T - b["y"][:, None]
        expected += ((2 * resid * b["x"]) ** 2).sum(0, keepdim=True)
    assert torch.allclose(fisher["weight"], expected / 12, atol=1e-6)


@pytest.mark.e2e
def test_l2sp_pulls_weights_back_in_a_run(toy_classification, tmp_path):
    def drift(l2sp):
        raw = copy.deepcopy(toy_classification["config"])
        raw["regularization"] = {"l2sp": l2sp}
        raw["checkpoint"] = {"final": "last"}
        out = tmp_path / f"l2sp{l2sp}"
        run_training(Config.model_validate(raw), out, show_progress=False)
        from safetensors.torch import load_file

        start, end = load_file(str(raw["model"]["name"] + "/model.safetensors")), load_file(str(out / "final/model.safetensors"))
        keys = [k for k in start if k.startswith("bert.encoder")]
        return sum(float(((end[k] - start[k]) ** 2).sum()) for k in keys)

    assert drift(50.0) < 0.5 * drift(0.0)


@pytest.mark.unit
def test_mixout_mixes_and_is_unbiased():
    torch.manual_seed(0)
    w0, w = torch.randn(200, 50), torch.randn(200, 50)
    mix = Mixout(w0, p=0.3)
    out = mix(w)
    # each element is either the pre-trained value or the rescaled fine-tuned one
    rescaled = (w - 0.3 * w0) / 0.7
    is_w0 = torch.isclose(out, w0, atol=1e-6)
    assert torch.all(is_w0 | torch.isclose(out, rescaled, atol=1e-6))
    assert 0.25 < is_w0.float().mean() < 0.35
    mean = torch.stack([mix(w) for _ in range(400)]).mean(0)
    # unbiased: the sample mean error is ~sqrt(p(1-p)/n)|w - w0|/(1-p), about 0.04 on average here
    assert (mean - w).abs().mean() < 0.06 and (mean - w).abs().max() < 0.6
    biased = torch.stack([torch.where(torch.rand_like(w) < 0.3, w0, w) for _ in range(400)]).mean(0)
    assert (biased - w).abs().mean() > 0.2  # without the rescaling the test would fail
    mix.eval()
    assert torch.equal(mix(w), w)


@pytest.mark.unit
def test_mixout_wraps_backbone_linears_and_is_removed_before_saving():
    m = bert(layers=2)
    n = apply_mixout(m, 0.1)
    assert n == 2 * 6 + 1  # q, k, v, attn-out, intermediate, output per block + pooler; not the head
    assert not any("classifier" in k and "original" in k for k in m.state_dict())
    with torch.no_grad():
        m.bert.pooler.dense.parametrizations.weight.original.add_(1.0)
    trained = m.bert.pooler.dense.parametrizations.weight.original.detach().clone()
    remove_mixout(m)
    assert torch.equal(m.bert.pooler.dense.weight, trained)
    assert "bert.pooler.dense.weight" in m.state_dict()


# ------------------------------------------------------------------ gradual unfreezing


@pytest.mark.unit
def test_gradual_unfreezing_order_and_optimizer_state():
    m = bert(layers=3)
    opt = build_optimizer(param_groups(m, lr=1e-3, weight_decay=0.0))
    unfreezer = GradualUnfreezer(m, every=1, unit="steps")

    def trainable_blocks():
        return sorted({int(n.split(".")[3]) for n, p in m.named_parameters() if p.requires_grad and ".layer." in n})

    unfreezer(0, 0)
    assert trainable_blocks() == [] and m.classifier.weight.requires_grad and m.bert.pooler.dense.weight.requires_grad
    assert not m.bert.embeddings.word_embeddings.weight.requires_grad
    step(m, opt)
    assert m.bert.encoder.layer[2].output.dense.weight not in opt.state
    unfreezer(0, 1)
    assert trainable_blocks() == [2]
    step(m, opt)
    assert m.bert.encoder.layer[2].output.dense.weight in opt.state  # joined the optimizer
    assert m.bert.encoder.layer[1].output.dense.weight not in opt.state
    unfreezer(0, 3)
    assert trainable_blocks() == [0, 1, 2] and not m.bert.embeddings.word_embeddings.weight.requires_grad
    unfreezer(0, 4)
    assert m.bert.embeddings.word_embeddings.weight.requires_grad


# ------------------------------------------------------------------ exact resume with the techniques on




@pytest.mark.parametrize("extra", [
    {"regularization": {"l2sp": 1.0, "mixout": 0.1}},
    {"unfreeze": {"every": 3, "unit": "steps"}, "regularization": {"ewc": 10.0, "ewc_batches": 2}},
    {"method": "freeze", "freeze": {"embeddings": True, "blocks": 1}, "optim": {"layer_lr_decay": 0.8, "lr": 3e-3}},
])
@pytest.mark.e2e
def test_resume_is_exact_with_techniques(toy_classification, tmp_path, extra):
    from safetensors.torch import load_file

    raw = copy.deepcopy(toy_classification["config"])
    for k, v in extra.items():
        raw[k] = {**raw.get(k, {}), **v} if isinstance(v, dict) else v
    raw["checkpoint"] = {"final": "last"}
    raw["train"]["eval_every"] = 3
    run_training(Config.model_validate(raw), tmp_path / "full", show_progress=False)
    cut = run_training(Config.model_validate(raw), tmp_path / "cut", show_progress=False, should_stop=stop_after(5))
    assert cut["status"] == "interrupted"
    run_training(Config.model_validate(raw), tmp_path / "cut", resume="auto", show_progress=False)
    a = load_file(str(tmp_path / "full/final/model.safetensors"))
    b = load_file(str(tmp_path / "cut/final/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ precision, checkpointing


@pytest.mark.parity
def test_gradient_checkpointing_gives_the_same_gradient():
    from tunelab.run import enable_gradient_checkpointing

    grads = []
    for ckpt in (False, True):
        m = bert()
        m.config.hidden_dropout_prob = m.config.attention_probs_dropout_prob = 0.0
        for mod in m.modules():
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
        m.train()
        if ckpt:
            enable_gradient_checkpointing(m)
            assert any(getattr(mod, "gradient_checkpointing", False) for mod in m.modules())
        torch.manual_seed(1)
        x = torch.randint(0, 50, (4, 6))
        m(input_ids=x, labels=torch.tensor([0, 1, 0, 1])).loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.e2e
def test_mixed_precision_trains_with_fp32_master_weights(toy_classification, tmp_path, precision):
    raw = copy.deepcopy(toy_classification["config"])
    raw["train"].update({"precision": precision, "epochs": 8})
    s = run_training(Config.model_validate(raw), tmp_path / precision, show_progress=False)
    assert s["precision"] == precision and s["status"] == "completed"
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / precision / "final/model.safetensors"))
    assert all(t.dtype == torch.float32 for t in weights.values())
    import json

    losses = [json.loads(l)["loss"] for l in (tmp_path / precision / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert losses[-1] < losses[0]


@pytest.mark.parity
def test_feature_cache_matches_the_uncached_run(toy_classification, tmp_path):
    """Cached head inputs give the same training as running the frozen backbone every step."""
    from safetensors.torch import load_file

    results = {}
    for cache in (True, False):
        raw = copy.deepcopy(toy_classification["config"])
        raw["method"] = "feature_extraction"
        raw["feature_extraction"] = {"cache_features": cache}
        raw["checkpoint"] = {"final": "last"}
        s = run_training(Config.model_validate(raw), tmp_path / str(cache), show_progress=False)
        results[cache] = (s, load_file(str(tmp_path / str(cache) / "final/model.safetensors")))
    (s_c, w_c), (s_u, w_u) = results[True], results[False]
    assert s_c["data"]["feature_cache"]["train"] == [64, 32] and "feature_cache" not in s_u["data"]
    assert torch.allclose(w_c["classifier.weight"], w_u["classifier.weight"], atol=1e-5)
    base = load_file(str(toy_classification["config"]["model"]["name"]) + "/model.safetensors")
    assert torch.equal(w_c["bert.encoder.layer.0.output.dense.weight"], base["bert.encoder.layer.0.output.dense.weight"])
    assert s_c["final"]["accuracy"] == pytest.approx(s_u["final"]["accuracy"])
    assert s_c["final"]["loss"] == pytest.approx(s_u["final"]["loss"], rel=1e-4)


# ------------------------------------------------------------------ forgetting probe


@pytest.mark.unit
def test_probe_compare_by_hand():
    from tunelab.evaluate.probe import compare

    e = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    f = torch.nn.functional.normalize(torch.tensor([[1.0, 1.0], [0.0, 1.0]]), dim=-1)
    r = compare({"embeddings": e, "lm_loss": 2.0}, {"embeddings": f, "lm_loss": 3.0}, warn_loss_increase=0.25)
    assert r["embedding_cosine_mean"] == pytest.approx((2 ** -0.5 + 1) / 2)
    assert r["embedding_cosine_min"] == pytest.approx(2 ** -0.5)
    assert r["lm_loss_change"] == pytest.approx(0.5) and r["forgetting_flag"] and "rose 50%" in r["message"]
    r = compare({"embeddings": e, "lm_loss": None}, {"embeddings": e, "lm_loss": None}, warn_loss_increase=0.25)
    assert r["embedding_cosine_mean"] == pytest.approx(1.0) and not r["forgetting_flag"]


@pytest.mark.e2e
def test_probe_in_a_run_sees_more_drift_at_a_higher_lr(toy_classification, tmp_path):
    from conftest import write_jsonl, sentiment_rows

    probe = write_jsonl(tmp_path / "probe.jsonl", sentiment_rows(20, seed=9))
    cosines = {}
    for lr in (1e-5, 3e-3):
        raw = copy.deepcopy(toy_classification["config"])
        raw["optim"]["lr"] = lr
        raw["probe"] = {"data": str(probe)}
        s = run_training(Config.model_validate(raw), tmp_path / str(lr), show_progress=False)
        assert s["probe"]["rows"] == 20 and "lm_loss_change" not in s["probe"]
        cosines[lr] = s["probe"]["embedding_cosine_mean"]
    assert cosines[1e-5] > 0.99 and cosines[3e-3] < cosines[1e-5]


@pytest.mark.e2e
def test_replay_data_is_mixed_into_each_epoch(toy_classification, tmp_path):
    from conftest import write_jsonl, sentiment_rows

    replay = write_jsonl(tmp_path / "replay.jsonl", sentiment_rows(40, seed=11))
    raw = copy.deepcopy(toy_classification["config"])
    raw["regularization"] = {"replay_data": str(replay), "replay_ratio": 0.2}
    s = run_training(Config.model_validate(raw), tmp_path / "run", show_progress=False)
    # 64 training rows + 16 replay rows per epoch = 80 = 10 batches of 8, for 2 epochs
    assert s["samples"] == 160 and s["steps"] == 20


@pytest.mark.unit
def test_ewc_fisher_from_a_named_reference_file(toy_classification, tmp_path):
    from conftest import write_jsonl, sentiment_rows
    from tunelab.compose import setup_task
    from tunelab.run import fisher_batches

    ref = write_jsonl(tmp_path / "ref.jsonl", sentiment_rows(12, seed=4))
    raw = copy.deepcopy(toy_classification["config"])
    raw["regularization"] = {"ewc": 1.0, "ewc_data": str(ref), "ewc_batches": 5}
    cfg = Config.model_validate(raw)
    batches = fisher_batches(setup_task(cfg), cfg)
    assert [len(b["labels"]) for b in batches] == [8, 4]  # 12 rows in batches of 8: the named file, not train


@pytest.mark.unit
def test_auto_precision_follows_the_measured_threshold(monkeypatch):
    from tunelab.train import precision
    from tunelab.train.precision import CPU_BF16_MIN_PARAMS, resolve_precision

    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    assert resolve_precision("auto", cpu, 22_700_000) == "bf16"  # MiniLM: ~2x faster in bf16 here
    assert resolve_precision("auto", cpu, 660_000) == "fp32"  # toy models: no clear gain
    assert resolve_precision("fp32", cpu, 10 * CPU_BF16_MIN_PARAMS) == "fp32"  # explicit wins
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)  # emulated bf16 (AVX2 only): ~50x slower
    assert resolve_precision("auto", cpu, 22_700_000) == "fp32"
