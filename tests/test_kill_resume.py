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
            if path.name == "optimizer.pt" and path.parent.name == ".tmp-" + checkpoint.checkpoint_name(int(at)):
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


@pytest.fixture
def kill_setup(toy_classification, tmp_path):
    cfg = toy_classification["config"]
    cfg["train"].update({"epochs": 3, "log_every": 1, "eval_every": 4})
    cfg["checkpoint"] = {"save_every": 2, "final": "last", "keep_last": 2}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    reference = tmp_path / "reference"
    finish(start(tmp_path, path, reference))
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
    assert (ckpts / ".tmp-step-000006").is_dir()  # the half-written save
    assert not (ckpts / "step-000006").exists()
    from tunelab.train.checkpoint import verify

    assert verify(ckpts / "step-000004") is None  # the previous one is intact
    text = finish(start(tmp_path, config, out, "--resume", "auto"))
    assert "incomplete save" in text and "step-000004" in text
    assert same_weights(load_file(str(out / "final" / "model.safetensors")), reference)
    assert not any(p.name.startswith(".tmp-") for p in ckpts.iterdir())
