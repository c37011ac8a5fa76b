"""Strict inputs beyond the one-line corpus: what must still be accepted (opt-ins), what a model
load says, and a conversation of thousands of messages encoded in linear time (counted in
template renders, not seconds, so a loaded machine cannot make it flaky)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.errors import InputError

runner = CliRunner()


# ---------------------------------------------------------------- a long conversation is linear


def _renders(tokenizer, n_messages: int, max_length: int) -> int:
    from tunelab.data.chat import ChatData, Message
    from tunelab.data.chat_template import check_template, encode_dataset

    msgs = [Message("user" if i % 2 == 0 else "assistant", f"What is two plus two? message {i} Four.")
            for i in range(n_messages)]
    real, calls = tokenizer.apply_chat_template, {"n": 0, "messages": 0}

    def counting(messages, *a, **k):
        calls["n"] += 1
        calls["messages"] += len(messages)
        return real(messages, *a, **k)

    tokenizer.apply_chat_template = counting
    try:
        examples, stats = encode_dataset(ChatData("conversations", [msgs], [], ["f.jsonl:1"]), tokenizer, max_length)
        check_template(tokenizer, [msgs])
    finally:
        tokenizer.apply_chat_template = real
    assert stats["truncated"] == 1 and len(examples[0].input_ids) == max_length
    return calls["messages"]


@pytest.mark.unit
def test_a_4000_message_conversation_costs_linear_work(tiny_chat_tokenizer):
    """Messages rendered in total (each render costs its length): was n^2/2 (8 million for 4000)."""
    small, large = _renders(tiny_chat_tokenizer, 500, 256), _renders(tiny_chat_tokenizer, 4000, 256)
    assert large < 2 * 4000 + 5000, large  # one full render, plus the turns before the cut
    assert large - small <= 2 * 3500 + 100  # the growth is one render's worth: linear in n


@pytest.mark.unit
def test_the_spans_are_the_same_as_the_quadratic_reference(tiny_chat_tokenizer):
    """encode_within's cut-short spans equal encode_full's spans cut at max_length."""
    from tunelab.data.chat import Message
    from tunelab.data.chat_template import _cut, encode_full, encode_within

    msgs = [Message("user" if i % 2 == 0 else "assistant", f"turn {i} is here, two plus two.") for i in range(60)]
    for max_length in (17, 40, 64, 255, 10_000):
        fast, n = encode_within(msgs, tiny_chat_tokenizer, max_length)
        slow = _cut(encode_full(msgs, tiny_chat_tokenizer), max_length, "truncate")
        assert (fast is None) == (slow is None)
        if slow is not None:
            assert fast.input_ids == slow.input_ids and fast.labels == slow.labels
        assert n == len(encode_full(msgs, tiny_chat_tokenizer))


# ---------------------------------------------------------------- opt-ins that must keep working


def _config(tmp_path: Path, model: Path, extra: str = "", data: str = "") -> Path:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"model:\n  name: {model}\n  max_length: 32\n{extra}data:\n  train: train.csv\n{data}"
                   "train:\n  max_steps: 1\n  batch_size: 4\n  eval_before: false\nearly_stopping:\n  enabled: false\n")
    return cfg


@pytest.mark.unit
def test_a_missing_value_label_is_a_class_when_listed(tmp_path):
    from tunelab.config import Config
    from tunelab.data.classification import load_train_eval

    rows = "".join(f"t{i},{'None' if i % 2 else 'pos'}\n" for i in range(8))
    (tmp_path / "train.csv").write_text("text,label\n" + rows)
    data = Config.model_validate({"data": {"train": str(tmp_path / "train.csv"), "labels": ["None", "pos"]}}).data
    train, _, names = load_train_eval(data, seed=0)
    assert names == ["None", "pos"] and len(train) + 2 == 8
    data = Config.model_validate({"data": {"train": str(tmp_path / "train.csv")}}).data
    with pytest.raises(InputError, match="looks like a missing value"):
        load_train_eval(data, seed=0)


def _pickle_model(tmp_path: Path, tiny_bert: Path, payload=None) -> Path:
    import shutil

    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_bert, folder)
    weights = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    if payload is None:
        torch.save(weights, folder / "pytorch_model.bin")
    else:
        (folder / "pytorch_model.bin").write_bytes(payload)
    return folder


class _Boom:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED",))


@pytest.mark.unit
def test_pickle_weights_load_with_weights_only_when_opted_in(tmp_path, tiny_bert):
    from tunelab.models.load import load_classifier
    from tunelab.models.registry import resolve_model

    folder = _pickle_model(tmp_path, tiny_bert)
    with pytest.raises(InputError, match="model.allow_pickle"):
        load_classifier(resolve_model(str(folder)), ["a", "b"])
    model = load_classifier(resolve_model(str(folder)), ["a", "b"], allow_pickle=True)
    assert model.config.num_labels == 2


@pytest.mark.e2e
def test_a_malicious_pickle_is_never_run_even_when_opted_in(tmp_path, tiny_bert, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = _pickle_model(tmp_path, tiny_bert, payload=pickle.dumps({"w": _Boom()}))
    (tmp_path / "train.csv").write_text("text,label\n" + "".join(f"t{i},{'ab'[i % 2]}\n" for i in range(8)))
    for extra in ("", "  allow_pickle: true\n"):
        cfg = _config(tmp_path, folder)
        cfg.write_text(cfg.read_text().replace("  max_length: 32\n", "  max_length: 32\n" + extra))
        res = runner.invoke(app, ["train", str(cfg), "--output-dir", str(tmp_path / "run"), "--no-progress"])
        assert res.exit_code == 2, res.output
        assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.output, res.stderr
        assert "pickled" in res.stderr and "model.name" in res.stderr
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "run").exists()


@pytest.mark.unit
def test_a_new_head_is_said_in_one_line_and_nothing_else_is_reinitialised(tiny_bert, caplog):
    from tunelab.models.load import load_classifier
    from tunelab.models.registry import resolve_model

    model = load_classifier(resolve_model(str(tiny_bert)), ["a", "b", "c"])  # saved with 2 labels
    assert model.tunelab_load_note == "new head initialised (not in the base model): classifier.bias, classifier.weight"
    same = load_classifier(resolve_model(str(tiny_bert)), ["a", "b"])
    assert same.tunelab_load_note is None


@pytest.mark.unit
def test_a_damaged_metrics_line_in_the_middle_is_an_input_error_on_resume(tmp_path):
    from tunelab.run_dir import trim_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(InputError) as info:
        trim_metrics(path, 3)
    assert info.value.line == 2 and "damaged line" in info.value.message
    assert path.read_text().count("\n") == 3  # untouched


@pytest.mark.e2e
def test_an_output_dir_under_a_file_is_refused_before_the_setup(tmp_path):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "train.csv").write_text("text,label\na,pos\nb,neg\n")
    cfg = _config(tmp_path, tmp_path / "no-model")
    res = runner.invoke(app, ["train", str(cfg), "--output-dir", str(tmp_path / "afile" / "run"), "--no-progress"])
    assert res.exit_code == 2 and res.stderr.strip().endswith("afile is a file"), res.stderr


@pytest.mark.e2e
def test_a_checkpoint_with_a_pickled_object_is_refused_on_resume(toy_classification, tmp_path):
    """Even with a manifest that matches, a checkpoint's .pt file holding code is refused, not run."""
    import hashlib

    import yaml

    from conftest import stop_after
    from tunelab.config import load_config
    from tunelab.run import run_training

    cfg = toy_classification["config"]
    cfg["train"].update({"max_steps": 4, "eval_every": 2})
    config = toy_classification["dir"] / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    run_training(load_config(config), out, show_progress=False, should_stop=stop_after(2))
    ck = sorted((out / "checkpoints").glob("step-*"))[-1]
    (ck / "scheduler.pt").write_bytes(pickle.dumps(_Boom()))
    manifest = json.loads((ck / "manifest.json").read_text())
    data = (ck / "scheduler.pt").read_bytes()
    manifest["files"]["scheduler.pt"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (ck / "manifest.json").write_text(json.dumps(manifest))
    res = runner.invoke(app, ["train", str(config), "--output-dir", str(out), "--no-progress", "--resume", "auto"])
    assert res.exit_code == 2, res.output
    assert res.stderr.strip().splitlines()[-1].startswith(f"error: {ck}: a checkpoint file holds objects"), res.stderr
    assert not Path("PWNED").exists()
