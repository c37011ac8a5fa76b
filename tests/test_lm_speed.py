"""tasks/lm_speed.py end to end: a packed chat run with the speed switches on trains like the exact
path (same losses, step by step), and resumes bit-identically."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("one_torch_thread")]

EXACT = {"packed_attention": "mask", "loss_chunk_tokens": 0, "recompute_norms": False}
FAST = {"packed_attention": "split", "loss_chunk_tokens": 7, "recompute_norms": True}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from tiny_models import tiny_llama_folder

    return tiny_llama_folder(tmp_path_factory.mktemp("tiny_llama"))


def _run(tmp_path, model, name, train: dict, resume=None, should_stop=None):
    import json

    from tiny_models import conversations

    from tunelab.config import Config
    from tunelab.monitor.metrics_log import read_metrics
    from tunelab.run import run_training

    data = tmp_path / "train.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps(c) + "\n" for c in conversations(24)), encoding="utf-8")
    raw = {"task": "chat", "model": {"name": str(model), "max_length": 64},
           "data": {"train": str(data), "eval_split": 0, "packing": True, "cache": False},
           "optim": {"lr": 3e-3}, "schedule": {"name": "constant", "warmup_steps": 0},
           "train": {"max_steps": 4, "batch_size": 2, "log_every": 1, "seed": 1, "eval_before": False,
                     **train},
           "checkpoint": {"final": "last", "keep_last": 1}, "early_stopping": {"enabled": False},
           "eval": {"generate": {"n": 0}}}
    run_training(Config.model_validate(raw), tmp_path / name, show_progress=False, resume=resume, should_stop=should_stop)
    return [r["loss"] for r in read_metrics(tmp_path / name / "metrics.jsonl") if "loss" in r]


def test_fast_switches_train_like_the_exact_path(tmp_path, tiny_llama):
    exact = _run(tmp_path, tiny_llama, "exact", EXACT)
    fast = _run(tmp_path, tiny_llama, "fast", FAST)
    assert len(fast) == len(exact) == 4
    for a, b in zip(fast, exact):
        assert a == pytest.approx(b, rel=1e-4)


def test_fast_switches_resume_bit_identical(tmp_path, tiny_llama):
    from conftest import stop_after
    from safetensors.torch import load_file

    straight = _run(tmp_path, tiny_llama, "straight", FAST)
    _run(tmp_path, tiny_llama, "cut", FAST, should_stop=stop_after(2))
    resumed = _run(tmp_path, tiny_llama, "cut", FAST, resume="auto")
    assert resumed == straight
    a = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
