"""task: preference — each loss against its paper's formula computed by hand, the masks against a
hand-built expectation, answer log-probs against a plain transformers forward, the reference trick
(adapter off = the base; cached = recomputed, and not recomputed on resume), bad pairs located,
truncation, accumulation = one large batch, exact resume, SFT -> DPO, and the health events."""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from conftest import stop_after, tiny_chat_tokenizer_build, tiny_llama_build, write_jsonl
from tunelab.compose import setup_task
from tunelab.config import Config, PreferenceConfig
from tunelab.data.chat import Message
from tunelab.data.chat_template import IGNORE_INDEX
from tunelab.data.preference import PreferencePair, encode_pairs, read_preference_data
from tunelab.distributed import ALONE
from tunelab.errors import InputError
from tunelab.monitor.health import HealthMonitor
from tunelab.tasks.preference import pair_batch
from tunelab.tasks.preference_logps import CACHE_FILE, adapter_off_logps, answer_logps
from tunelab.train.preference_losses import PreferenceLoss, loss_from_config

torch.set_num_threads(1)  # hidden-32 models: a second thread only waits for its core on a shared 2-core box

PAIRS = [
    {"prompt": "What is two plus two?", "chosen": "Four.", "rejected": "Six, I think."},
    {"prompt": "Name a color.", "chosen": "Red.", "rejected": "Apple."},
    {"prompt": "Translate hello to French.", "chosen": "Bonjour.", "rejected": "Thank you!"},
    {"prompt": "Name a fruit.", "chosen": "Apple.", "rejected": "The sea is blue."},
    {"prompt": [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Name a color."},
                {"role": "assistant", "content": "Red."}, {"role": "user", "content": "And a fruit?"}],
     "chosen": [{"role": "assistant", "content": "Apple."}], "rejected": [{"role": "assistant", "content": "A dog."}]},
    {"prompt": "Tell me a story about a cat.", "chosen": "A cat and a dog sing at every tide.", "rejected": "No."},
    {"prompt": "Write a short poem about the sea.", "chosen": "The sea is blue and wide.", "rejected": "Six."},
    {"prompt": "And three plus three?", "chosen": "Six.", "rejected": "Four."},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pref_model")
    tok = tiny_chat_tokenizer_build()
    tiny_llama_build(len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tok():
    return tiny_chat_tokenizer_build()


def raw_config(model_dir, train_file, **over) -> dict:
    raw = {"task": "preference", "model": {"name": str(model_dir), "max_length": 64},
           "data": {"train": str(train_file), "eval_split": 0.0}, "method": "full",
           "optim": {"lr": 1e-2, "weight_decay": 0.0}, "schedule": {"name": "constant", "warmup_ratio": 0.0},
           "train": {"max_steps": 2, "batch_size": 4, "log_every": 1, "eval_before": False},
           "early_stopping": {"enabled": False}}
    for key, value in over.items():
        section, _, name = key.partition(".")
        if name:
            raw.setdefault(section, {})[name] = value
        else:
            raw[section] = value
    return raw


def sigmoid_log(x: float) -> float:
    return -math.log1p(math.exp(-x))


# ------------------------------------------------------------------------------------ the losses


@pytest.mark.unit
def test_each_loss_equals_its_paper_formula_computed_by_hand():
    c, r = [-12.0, -30.5, -7.25], [-14.0, -29.0, -9.5]
    rc, rr = [-13.0, -30.0, -8.0], [-13.5, -29.5, -9.0]
    nc, nr = [4.0, 10.0, 3.0], [5.0, 9.0, 4.0]
    t = [torch.tensor(v, dtype=torch.float64) for v in (c, r, nc, nr, rc, rr)]
    for name, beta, eps, gamma in (("dpo", 0.1, 0.0, 0), ("dpo", 0.5, 0.2, 0), ("ipo", 0.1, 0, 0), ("ipo", 0.5, 0, 0),
                                   ("orpo", 0.1, 0, 0), ("simpo", 2.0, 0, 1.0), ("simpo", 2.5, 0, 0.3)):
        loss, reward_c, reward_r = PreferenceLoss(name, beta, eps, gamma)(*t)
        for i in range(3):
            h = (c[i] - rc[i]) - (r[i] - rr[i])
            mc, mr = c[i] / nc[i], r[i] / nr[i]
            if name == "dpo":  # Rafailov et al. eq. 7; cDPO: Mitchell 2023
                want = -(1 - eps) * sigmoid_log(beta * h) - eps * sigmoid_log(-beta * h)
                want_rc, want_rr = beta * (c[i] - rc[i]), beta * (r[i] - rr[i])
            elif name == "ipo":  # Azar et al. eq. 17
                want = (h - 1 / (2 * beta)) ** 2
                want_rc, want_rr = beta * (c[i] - rc[i]), beta * (r[i] - rr[i])
            elif name == "orpo":  # Hong et al.: L_SFT + lambda L_OR, odds = P / (1 - P)
                odds = lambda m: math.exp(m) / (1 - math.exp(m))  # noqa: E731
                want = -mc - beta * sigmoid_log(math.log(odds(mc) / odds(mr)))
                want_rc, want_rr = beta * mc, beta * mr
            else:  # Meng et al. eq. 6
                want = -sigmoid_log(beta * mc - beta * mr - gamma)
                want_rc, want_rr = beta * mc, beta * mr
            assert loss[i].item() == pytest.approx(want, rel=1e-12), (name, i)
            assert (reward_c[i].item(), reward_r[i].item()) == pytest.approx((want_rc, want_rr), rel=1e-12)


@pytest.mark.unit
def test_defaults_are_the_papers():
    for loss, beta in (("dpo", 0.1), ("ipo", 0.1), ("simpo", 2.0), ("orpo", 0.1)):
        pl = loss_from_config(PreferenceConfig(loss=loss))
        assert (pl.name, pl.beta) == (loss, beta)
    assert loss_from_config(PreferenceConfig(loss="simpo")).gamma == 1.0
    assert loss_from_config(PreferenceConfig()).label_smoothing == 0.0
    with pytest.raises(ValueError, match="orpo_lambda"):
        PreferenceConfig(loss="orpo", beta=0.3)
    with pytest.raises(ValueError, match="label_smoothing"):
        PreferenceConfig(loss="ipo", label_smoothing=0.1)


# ------------------------------------------------------------------------------ data and masks


def supervised_ids(ex) -> list[int]:
    return [t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE_INDEX]


@pytest.mark.unit
def test_masks_are_exactly_the_answer_tokens(tok, tmp_path):
    pairs = read_preference_data(write_jsonl(tmp_path / "p.jsonl", PAIRS))
    encoded, stats = encode_pairs(pairs, tok, 128)
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is two plus two?"}], tokenize=False,
                                     add_generation_prompt=True)
    first = encoded[0]
    assert first.chosen.input_ids == ids(prompt + "Four.<|im_end|>\n")
    assert supervised_ids(first.chosen) == ids("Four.<|im_end|>")  # the reply and its end-of-turn, nothing else
    assert supervised_ids(first.rejected) == ids("Six, I think.<|im_end|>")
    # conversational: the history's own assistant turn ("Red.") is context, never supervised
    conv = encoded[4]
    assert supervised_ids(conv.chosen) == ids("Apple.<|im_end|>")
    assert supervised_ids(conv.rejected) == ids("A dog.<|im_end|>")
    history = tok.apply_chat_template(PAIRS[4]["prompt"], tokenize=False, add_generation_prompt=True)
    assert conv.chosen.input_ids[: len(ids(history))] == ids(history)
    assert stats["pairs"] == len(PAIRS) and stats["truncated_prompts"] == stats["truncated_answers"] == 0


@pytest.mark.unit
def test_truncation_keeps_the_prompts_end_and_the_answers_start_and_is_counted(tok):
    long_prompt = " ".join(["Tell me a story about a cat and a dog."] * 2)  # fits max_length alone
    long_answer = " ".join(["The sea is blue and wide, it sings at every tide."] * 6)
    pair = PreferencePair([Message("user", long_prompt)], [Message("assistant", long_answer)],
                          [Message("assistant", "No.")], "x.jsonl:1")
    (whole,), _ = encode_pairs([pair], tok, 10_000)
    (cut,), stats = encode_pairs([pair], tok, 48, max_prompt_length=20)
    assert stats["truncated_prompts"] == 1 and stats["truncated_answers"] == 1
    assert len(cut.chosen) == 48
    p_whole = next(i for i, t in enumerate(whole.chosen.labels) if t != IGNORE_INDEX)
    p_cut = next(i for i, t in enumerate(cut.chosen.labels) if t != IGNORE_INDEX)
    assert p_cut == 20 and cut.chosen.input_ids[:p_cut] == whole.chosen.input_ids[p_whole - 20 : p_whole]  # the end
    assert cut.chosen.input_ids[p_cut:] == whole.chosen.input_ids[p_whole : p_whole + 28]  # the start
    assert cut.rejected.input_ids == whole.rejected.input_ids[p_whole - 20 :]  # same prompt cut, short answer whole


@pytest.mark.parametrize("row, line_field", [
    ({"prompt": "Name a color.", "chosen": "Red.", "rejected": " Red. "}, "rejected"),
    ({"prompt": "Name a color.", "chosen": "", "rejected": "Blue."}, "chosen"),
    ({"prompt": "Name a color.", "chosen": "Red."}, "rejected"),
    ({"prompt": "Name a color.", "chosen": [{"role": "user", "content": "Red."}], "rejected": "Blue."}, "chosen[0].role"),
    ({"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], "chosen": "A",
      "rejected": "B"}, "prompt[1]"),
])
@pytest.mark.unit
def test_bad_pairs_are_named_with_file_line_and_field(tmp_path, row, line_field):
    path = write_jsonl(tmp_path / "bad.jsonl", [PAIRS[0], row])
    with pytest.raises(InputError) as e:
        read_preference_data(path)
    assert (e.value.file, e.value.line, e.value.field) == (str(path), 2, line_field)


@pytest.mark.e2e
def test_a_prompt_longer_than_max_length_is_named_and_the_cli_exits_2(model_dir, tmp_path, tok):
    from typer.testing import CliRunner

    from tunelab.cli import app

    rows = [PAIRS[0], {"prompt": " ".join(["Tell me a story about a cat."] * 20), "chosen": "A", "rejected": "B"}]
    train = write_jsonl(tmp_path / "long.jsonl", rows)
    with pytest.raises(InputError) as e:
        encode_pairs(read_preference_data(train), tok, 64)
    assert (e.value.line, e.value.field) == (2, "prompt")
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps(raw_config(model_dir, train)))
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", str(config), "-o", str(out), "--no-progress"])
    assert res.exit_code == 2, res.output
    lines = [x for x in res.output.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and "long.jsonl:2" in lines[0] and "prompt" in lines[0], res.output
    assert not out.exists()


# ---------------------------------------------------------------------- log-probs and references


@pytest.mark.parity
def test_answer_logps_equal_a_plain_forward_over_the_answer_tokens(model_dir, tok, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    pairs, _ = encode_pairs(read_preference_data(write_jsonl(tmp_path / "p.jsonl", PAIRS)), tok, 128)
    batch = pair_batch(pairs, [0, 4, 5], tok.pad_token_id)
    with torch.no_grad():
        got, ntok = answer_logps(model, batch)
        logp = torch.log_softmax(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, -1)
    for row in range(6):
        ex = [pairs[i].chosen for i in (0, 4, 5)][row] if row < 3 else [pairs[i].rejected for i in (0, 4, 5)][row - 3]
        want = sum(logp[row, t - 1, ex.input_ids[t]].item() for t in range(1, len(ex)) if ex.labels[t] != IGNORE_INDEX)
        assert got[row].item() == pytest.approx(want, abs=1e-4)
        assert ntok[row].item() == ex.supervised()


@pytest.mark.parity
def test_adapter_off_is_the_base_model(model_dir, tok, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    pairs, _ = encode_pairs(read_preference_data(write_jsonl(tmp_path / "p.jsonl", PAIRS)), tok, 128)
    batch = pair_batch(pairs, list(range(len(pairs))), tok.pad_token_id)
    with torch.no_grad():
        base, _ = answer_logps(model, batch)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    torch.manual_seed(1)
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.5)  # a trained adapter: it changes the answers' log-probs
    peft_model.train()
    with torch.no_grad():
        policy, _ = answer_logps(peft_model, batch)
    assert (policy - base).abs().max() > 1e-2
    torch.testing.assert_close(adapter_off_logps(peft_model, batch), base, rtol=0, atol=1e-5)
    assert peft_model.training  # switched back to train mode


def steps(raw: dict, tmp_path: Path, optimizer="sgd", **settings):
    """`settings` steps of the real loop on the task (no run dir), SGD at lr 1: weights after them."""
    from tunelab.models.adapt import apply_method
    from tunelab.train.early_stop import BestTracker
    from tunelab.train.loop import LoopSettings, LoopState, train_loop

    class NullIO:
        def __init__(self):
            self.rows = []

        def log(self, row):
            self.rows.append(row)

        def save(self, *a):
            pass

        def stop_requested(self):
            return False

    cfg = Config.model_validate(raw)
    torch.manual_seed(0)
    task = setup_task(cfg)
    model = apply_method(task.model, cfg.method, task=cfg.task, freeze_cfg=cfg.freeze, lora=cfg.lora)
    if task.prepare is not None:
        tmp_path.mkdir(parents=True, exist_ok=True)
        task.prepare(model, tmp_path, ALONE, nullcontext)
    start = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    s = LoopSettings(total_steps=1, max_grad_norm=None, seed=0, log_every=1, eval_every=None, save_every=None,
                     early_stopping=False, **settings)
    io = NullIO()
    train_loop(model, opt, sched, task, s, LoopState(), BestTracker("eval_loss", "min"), io, nullcontext)
    end = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    return end, io.rows, start


@pytest.mark.parametrize("method, loss", [("full", "dpo"), ("lora", "dpo"), ("qlora", "dpo"), ("lora", "ipo"), ("full", "orpo"),
                                          ("full", "simpo")])
@pytest.mark.parity
def test_accumulation_gives_the_one_large_batch_step(model_dir, tmp_path, method, loss):
    train = write_jsonl(tmp_path / "p.jsonl", PAIRS[:4])
    raw = raw_config(model_dir, train, method=method, preference={"loss": loss},
                     **({"lora": {"r": 4, "dropout": 0.0}} if method in ("lora", "qlora") else {}))
    one, rows_one, start = steps(raw, tmp_path / "a", batch_size=4, grad_accum=1)
    accum, rows_acc, _ = steps(raw, tmp_path / "b", batch_size=1, grad_accum=4)
    for k in one:
        torch.testing.assert_close(accum[k], one[k], rtol=1e-5, atol=1e-6)
    assert max((one[k] - start[k]).abs().max().item() for k in one) > 1e-3  # the step moved the weights
    reference_free = loss in ("orpo", "simpo")
    assert ("kl_ref" in rows_one[0]) is not reference_free
    assert (tmp_path / "a" / CACHE_FILE).is_file() is (method == "full" and not reference_free)
    for key in ("loss", "reward_margin", "pref_accuracy", "logp_chosen", *(() if reference_free else ("kl_ref",))):
        assert rows_acc[0][key] == pytest.approx(rows_one[0][key], rel=1e-5, abs=2e-5), key  # fp32 sums, other padding
    if loss == "dpo":
        assert rows_one[0]["loss"] == pytest.approx(math.log(2), rel=1e-6)  # policy = reference at the first step
    if loss == "ipo":
        assert rows_one[0]["loss"] == pytest.approx((1 / (2 * 0.1)) ** 2, rel=1e-6)  # h = 0 at the first step


@pytest.mark.parity
def test_reference_cache_equals_recomputed_and_a_resume_reads_it(model_dir, tmp_path):
    """Full DPO: the cached reference = answer log-probs of the untouched model; stopping after 2 of
    4 steps and resuming gives the uninterrupted run's rows and weights, without recomputing it."""
    from safetensors.torch import load_file

    from tunelab.run import run_training

    train = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    raw = raw_config(model_dir, train, **{"train": {"max_steps": 4, "batch_size": 2, "log_every": 1, "eval_every": 2,
                                                    "eval_before": True},
                                          "data": {"train": str(train), "eval_split": 0.25}})
    whole = run_training(Config.model_validate(raw), tmp_path / "whole", show_progress=False)
    assert whole["status"] == "completed"
    cache = load_file(str(tmp_path / "whole" / CACHE_FILE))
    task = setup_task(Config.model_validate(raw))  # the untouched model, the same pairs
    pairs = task.prepare.__self__.splits["train"]
    n = cache["train"].shape[0]
    assert n == len(pairs) == 6
    with torch.no_grad():
        logps, _ = answer_logps(task.model.eval(), pair_batch(pairs, list(range(n)), task.tokenizer.pad_token_id))
    torch.testing.assert_close(cache["train"], torch.stack([logps[:n], logps[n:]], 1), rtol=0, atol=1e-5)

    part = tmp_path / "part"
    stopped = run_training(Config.model_validate(raw), part, show_progress=False, should_stop=stop_after(2))
    assert stopped["status"] == "interrupted"
    stamp = (part / CACHE_FILE).stat().st_mtime_ns
    resumed = run_training(Config.model_validate(raw), part, resume="auto", show_progress=False)
    assert resumed["status"] == "completed" and (part / CACHE_FILE).stat().st_mtime_ns == stamp
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("elapsed", "memory_mb")} for r in rows]  # noqa: E731
    read = lambda p: [json.loads(x) for x in (p / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert strip(read(part)) == strip(read(tmp_path / "whole"))
    assert resumed["final"] == whole["final"]
    assert whole["before"]["eval_reward_margin"] == 0.0 and whole["final"]["pref_accuracy"] >= 0.5
    page = (tmp_path / "whole" / "report.html").read_text()
    assert all(f"data-plot='preference_{k}'" in page for k in ("reward_chosen", "reward_margin", "pref_accuracy", "kl_ref"))



# ----------------------------------------------------------------------------------- SFT -> DPO


@pytest.mark.e2e
def test_sft_run_then_dpo_from_its_final_adapter(model_dir, tmp_path):
    """A tunelab chat SFT run with LoRA; DPO starts from its final/ (the adapter merged into the base):
    the DPO LoRA policy's reference (adapter off) and the full-DPO start are the SFT model, not the base."""
    from tunelab.models.adapters import load_adapter
    from tunelab.run import run_training
    from transformers import AutoModelForCausalLM

    sft_data = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": p["prompt"], "completion": p["chosen"]}
                                                    for p in PAIRS if isinstance(p["prompt"], str)])
    sft = run_training(Config.model_validate({
        "task": "chat", "model": {"name": str(model_dir), "max_length": 64}, "data": {"train": str(sft_data), "eval_split": 0.0},
        "method": "lora", "lora": {"r": 4, "dropout": 0.0}, "optim": {"lr": 5e-2},
        "train": {"max_steps": 3, "batch_size": 4, "eval_before": False}, "early_stopping": {"enabled": False}}),
        tmp_path / "sft", show_progress=False)
    assert sft["status"] == "completed" and (tmp_path / "sft" / "final" / "adapter_config.json").is_file()
    sft_model, tok, _ = load_adapter(tmp_path / "sft" / "final", merge=True)
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    pairs_file = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    pairs, _ = encode_pairs(read_preference_data(pairs_file), tok, 64)
    batch = pair_batch(pairs, list(range(len(pairs))), tok.pad_token_id)
    with torch.no_grad():
        want, _ = answer_logps(sft_model.eval(), batch)
        assert (want - answer_logps(base, batch)[0]).abs().max() > 1e-3  # SFT moved the model

    from tunelab.models.adapt import apply_method

    for method, name in (("lora", tmp_path / "sft"), ("full", tmp_path / "sft" / "final")):  # a run dir or its final/
        cfg = Config.model_validate(raw_config(name, pairs_file, method=method,
                                               **({"lora": {"r": 4}} if method == "lora" else {})))
        task = setup_task(cfg)
        model = apply_method(task.model, cfg.method, task=cfg.task, freeze_cfg=cfg.freeze, lora=cfg.lora)
        with torch.no_grad():
            got = adapter_off_logps(model, batch) if method == "lora" else answer_logps(model.eval(), batch)[0]
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
        assert task.info["reference"] == ("adapter_off" if method == "lora" else "cached")
    # the DPO adapter trained on the SFT adapter reloads: its base is the SFT run's model, merged
    dpo = run_training(Config.model_validate(raw_config(tmp_path / "sft", pairs_file, method="lora", lora={"r": 4})),
                       tmp_path / "dpo", show_progress=False)
    assert dpo["status"] == "completed"
    reloaded, _, info = load_adapter(tmp_path / "dpo" / "final", merge=True)
    with torch.no_grad():
        moved = (answer_logps(reloaded.eval(), batch)[0] - want).abs().max().item()
    assert 0 < moved < 1.0, moved  # the SFT model plus two DPO steps, not the base


# ------------------------------------------------------------------------------------- health


def pref_rows(before: dict, evals: list[dict], prefix="eval_") -> list[dict]:
    rows = [{"step": 0, "before_training": True, **{prefix + k: v for k, v in before.items()}}]
    rows += [{"step": 10 * (i + 1), **{prefix + k: v for k, v in e.items()}} for i, e in enumerate(evals)]
    return rows


def kinds(rows: list[dict]) -> list[str]:
    monitor = HealthMonitor()
    return [e.kind for row in rows for e in monitor.observe(row)]


@pytest.mark.unit
def test_health_events_for_the_known_dpo_failures():
    start = {"loss": 0.693, "reward_margin": 0.0, "logp_chosen": -2.0, "logp_rejected": -2.1, "kl_ref": 0.0}
    healthy = [{**start, "loss": 0.5, "reward_margin": 0.8, "logp_chosen": -1.95, "logp_rejected": -2.4, "kl_ref": 0.01}]
    assert kinds(pref_rows(start, healthy)) == []
    # chosen falling 0.05 (under the bar), then 0.3 nats/token while the margin grows: displacement, once
    displaced = [{**start, "reward_margin": 0.5, "logp_chosen": -2.05}, {**start, "reward_margin": 1.5, "logp_chosen": -2.3},
                 {**start, "reward_margin": 2.0, "logp_chosen": -2.6}]
    assert kinds(pref_rows(start, displaced)) == ["likelihood_displacement"]
    # both fall but the margin shrinks: not displacement (the pairs are not being separated at all)
    assert kinds(pref_rows(start, [{**start, "reward_margin": -0.2, "logp_chosen": -2.5}])) == []
    # exploding margins on train rows
    train = [{"step": i + 1, "loss": 0.1, "lr": 1e-5, "grad_norm": 1.0, "reward_margin": m, "logp_chosen": -2.0,
              "logp_rejected": -3.0, "kl_ref": 0.1} for i, m in enumerate([1.0, 5.0, 12.0, 25.0, 40.0])]
    assert kinds(train) == ["margin_explosion"]
    assert kinds(train[:3]) == []
    # reference-free (no kl_ref): drift of the chosen answers' log-prob by more than 1 nat/token
    free = {k: v for k, v in start.items() if k != "kl_ref"}
    assert kinds(pref_rows(free, [{**free, "logp_chosen": -1.5, "logp_rejected": -2.9, "reward_margin": 0.2}])) == []
    assert kinds(pref_rows(free, [{**free, "logp_chosen": -0.8, "logp_rejected": -2.9, "reward_margin": 0.9}])) == [
        "reference_free_drift"]
    # the same move with a reference (DPO rows carry kl_ref) is not reference-free drift
    assert "reference_free_drift" not in kinds(pref_rows(start, [{**start, "logp_chosen": -3.5, "logp_rejected": -4.0,
                                                                    "reward_margin": -0.1}]))
    # a resumed run's monitor, rebuilt from the rows, does not fire again
    rows = pref_rows(start, displaced)
    replayed = HealthMonitor.replay(rows)
    assert replayed.observe({"step": 99, "eval_loss": 0.6, "eval_reward_margin": 3.0, "eval_logp_chosen": -3.0,
                             "eval_logp_rejected": -5.0, "eval_kl_ref": 0.3}) == []


@pytest.mark.e2e
@pytest.mark.parametrize("method", ["full", "lora"])
def test_dpo_with_bf16_weights(model_dir, tmp_path, method):
    """train.weights_dtype bf16 under DPO: the reference is the same bf16 model (cached for full, the adapter
    off for LoRA), so the untouched policy's margin is exactly 0; training moves the margin; final/ is bf16."""
    from safetensors.torch import load_file

    from tunelab.run import run_training

    train = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    raw = raw_config(model_dir, train, method=method,
                     **{"train": {"max_steps": 12, "batch_size": 4, "log_every": 1, "eval_every": 12, "eval_before": True,
                                  "weights_dtype": "bf16"},
                        "data": {"train": str(train), "eval_split": 0.25}})
    if method == "lora":
        raw["optim"]["lr"] = 5e-2
    out = run_training(Config.model_validate(raw), tmp_path / "run", show_progress=False)
    assert out["status"] == "completed" and out["precision"] == "bf16"
    assert out["before"]["eval_reward_margin"] == 0.0
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    margins = [r["reward_margin"] for r in rows if "reward_margin" in r]
    # the last four steps' mean margin above the first four's (measured, LoRA: -0.010 -> 0.055; the fp32-weight
    # run of the same config: -0.012 -> 0.055)
    assert len(margins) == 12 and sum(margins[-4:]) > max(0.0, sum(margins[:4]))
    if method == "full":
        assert load_file(str(tmp_path / "run" / CACHE_FILE))["train"].dtype == torch.float32
        weights = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    else:
        weights = load_file(str(tmp_path / "run" / "final" / "adapter_model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}


def test_cached_eval_reference_is_computed_in_evaluations_own_batches(model_dir, tmp_path, monkeypatch):
    """Full DPO: the eval pairs' reference log-probs are computed in exactly the batches evaluation
    runs (sorted by length, eval_batch_size at a time). Under bf16 autocast another padding width
    rounds the log-probs differently (SmolLM2, bf16: the untouched model's held-out margin came out
    -0.002 and its 'accuracy' 0.30 when the reference went in index order), so the same batches are
    what makes policy = reference read margin 0 and accuracy 0 before any step."""
    import tunelab.tasks.preference as pref
    from tiny_models import preference_pairs

    train = write_jsonl(tmp_path / "p.jsonl", preference_pairs(24))
    raw = raw_config(model_dir, train, **{"train": {"max_steps": 1, "batch_size": 2, "eval_batch_size": 3},
                                          "data": {"train": str(train), "eval_split": 0.5}})
    task = setup_task(Config.model_validate(raw))
    evals = task.prepare.__self__.splits["eval"]
    seen: list[tuple] = []
    real = pref.pair_batch
    monkeypatch.setattr(pref, "pair_batch", lambda pairs, idx, pad: (seen.append((pairs is evals, tuple(idx))),
                                                                      real(pairs, idx, pad))[1])
    task.prepare(task.model, tmp_path, ALONE)
    reference_batches = [idx for is_eval, idx in seen if is_eval]
    seen.clear()
    metrics = task.evaluate(task.model)
    eval_batches = [idx for is_eval, idx in seen if is_eval]
    assert len(evals) == 12 and eval_batches == reference_batches
    assert eval_batches != [tuple(range(s, s + 3)) for s in range(0, 12, 3)]  # not index order: the test can fail
    assert metrics["reward_margin"] == 0.0 and metrics["pref_accuracy"] == 0.0 and metrics["kl_ref"] == 0.0
