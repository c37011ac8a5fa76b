"""A real training process killed with SIGKILL (between steps and in the middle of a checkpoint
save) and resumed with --resume auto ends with the same weights as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

pytestmark = pytest.mark.e2e

# A subprocess entry point; with KILL_IN_SAVE_AT=N it SIGKILLs itself halfway through writing
# checkpoint N (after optimizer.pt, before the manifest): the worst moment for a crash.
RUNNER = textwrap.dedent("""
    import os, signal, sys
    from tunelab.train import checkpoint
    at = os.environ.get("KILL_IN_SAVE_AT")
    if at:
        real = checkpoint._fsync
        def fsync(path):
            real(path)
            if path.name == "optimizer.pt" and path.parent.name.startswith(".tmp-" + checkpoint.checkpoint_name(int(at)) + ".pid"):
                os.kill(os.getpid(), signal.SIGKILL)
        checkpoint._fsync = fsync
    from tunelab.cli import main
    sys.argv = ["tunelab"] + sys.argv[1:]
    main()
""")


def start(tmp_path, config, out, *extra, env=None):
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    return subprocess.Popen([sys.executable, str(runner), "train", str(config), "-o", str(out), "--no-progress", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})


def logged_steps(out) -> int:
    path = out / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.strip().endswith("}")]
    return max(steps, default=0)


def kill_at(proc, out, step: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while logged_steps(out) < step:
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.monotonic() < deadline, "run did not reach the kill step"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def finish(proc) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out.decode()
    return out.decode()


@pytest.fixture(scope="module")
def kill_setup(tiny_bert, tmp_path_factory):
    """The config and the weights of one uninterrupted run, shared by every test here."""
    from conftest import sentiment_rows, write_jsonl

    folder = tmp_path_factory.mktemp("kill")
    write_jsonl(folder / "train.jsonl", sentiment_rows(64, seed=1))
    write_jsonl(folder / "eval.jsonl", sentiment_rows(16, seed=2))
    cfg = {"model": {"name": str(tiny_bert), "max_length": 32},
           "data": {"train": str(folder / "train.jsonl"), "eval": str(folder / "eval.jsonl")},
           "optim": {"lr": 3e-3}, "schedule": {"name": "constant", "warmup_ratio": 0.1},
           "train": {"epochs": 3, "batch_size": 8, "seed": 3, "log_every": 1, "eval_every": 4},
           "checkpoint": {"save_every": 2, "final": "last", "keep_last": 2},
           "early_stopping": {"enabled": False}}
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    reference = folder / "reference"
    finish(start(folder, path, reference))
    return path, load_file(str(reference / "final" / "model.safetensors"))


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kill_steps", [[5], [3, 13]])  # one kill; two kills in one run (epoch 1 and 2)
def test_sigkill_between_steps_then_resume_is_exact(kill_setup, tmp_path, kill_steps):
    config, reference = kill_setup
    out = tmp_path / "killed"
    proc = start(tmp_path, config, out)
    for i, step in enumerate(kill_steps):
        kill_at(proc, out, step)
        proc = start(tmp_path, config, out, "--resume", "auto")
    text = finish(proc)
    assert "resumed from" in text
    assert same_weights(load_file(str(out / "final" / "model.safetensors")), reference)


def test_sigkill_in_the_middle_of_a_save_keeps_the_previous_checkpoint(kill_setup, tmp_path):
    config, reference = kill_setup
    out = tmp_path / "killed"
    proc = start(tmp_path, config, out, env={"KILL_IN_SAVE_AT": "6"})
    proc.wait(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    ckpts = out / "checkpoints"
    assert any(p.is_dir() for p in ckpts.glob(".tmp-step-000006*"))  # the half-written save (named with its pid)
    assert not (ckpts / "step-000006").exists()
    from tunelab.train.checkpoint import verify

    assert verify(ckpts / "step-000004") is None  # the previous one is intact
    text = finish(start(tmp_path, config, out, "--resume", "auto"))
    assert "incomplete save" in text and "step-000004" in text
    assert same_weights(load_file(str(out / "final" / "model.safetensors")), reference)
    assert not any(p.name.startswith(".tmp-") for p in ckpts.iterdir())


def test_sigterm_saves_at_the_step_boundary_and_says_how_to_resume(kill_setup, tmp_path):
    config, reference = kill_setup
    out = tmp_path / "stopped"
    proc = start(tmp_path, config, out)
    deadline = time.monotonic() + 120
    while logged_steps(out) < 4:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    text, _ = proc.communicate(timeout=120)
    text = text.decode()
    assert proc.returncode == 130, text
    assert "checkpoint saved" in text and "--resume auto" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    from tunelab.train.checkpoint import checkpoint_name, verify

    assert verify(out / "checkpoints" / checkpoint_name(summary["steps"])) is None
    finish(start(tmp_path, config, out, "--resume", "auto"))
    assert same_weights(load_file(str(out / "final" / "model.safetensors")), reference)
