"""The run dir under faults: one process per run dir (OS lock), disk full on every write path,
a torn metrics.jsonl on resume, atomic summary/report, and diagnoses that are true.

Most cases run the CLI in-process on the tiny BERT; the lock is also tested against a real second
process, and disk full once on a real tmpfs (skipped where mounting is not allowed).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.run_dir import RunLock

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


def write_config(folder: Path, cfg: dict, name: str = "config.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def quick(toy_classification):
    """A 6-step run of the tiny BERT with a checkpoint every 2 steps; returns (config path, folder)."""
    cfg = toy_classification["config"]
    cfg["train"].update({"max_steps": 6, "eval_every": 2, "log_every": 1})
    return write_config(toy_classification["dir"], cfg), toy_classification["dir"]


def train(config: Path, out: Path, *extra: str):
    return runner.invoke(app, ["train", str(config), "--output-dir", str(out), "--no-progress", *extra])


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith(("error:", "internal error:"))]


def assert_one_error(result, code: int, pattern: str) -> str:
    shown = f"exit {result.exit_code}\n{result.stderr}\n{result.stdout[-1500:]}"
    assert result.exit_code == code, shown
    assert "Traceback" not in result.output, shown
    lines = error_lines(result)
    assert len(lines) == 1 and result.stderr.strip().splitlines()[-1] == lines[0], shown
    assert re.search(pattern, lines[0]), f"{pattern!r} not in {lines[0]!r}"
    return lines[0]


# ---------------------------------------------------------------- the lock


@pytest.mark.e2e
def test_a_second_train_or_resume_on_a_locked_dir_is_refused_naming_the_holder(quick, tmp_path):
    """A real second process holds the run dir's lock (as a running `train` does); both a fresh train
    and a resume are exit 2 naming its pid and host; a SIGKILL releases it (kernel), and the dir is usable."""
    config, _ = quick
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from tunelab.run_dir import RunLock; "
         "RunLock(Path(sys.argv[1])).acquire(); print('locked', flush=True); time.sleep(120)", str(out)],
        stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "locked"
        import socket

        for extra in ((), ("--resume", "auto")):
            res = train(config, out, *extra)
            line = assert_one_error(res, 2, rf"another tunelab run is using this run dir \(pid {holder.pid} on ")
            assert socket.gethostname() in line and "started 20" in line
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # the refused runs wrote nothing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert RunLock(out).holder() is None  # no stale lock after a SIGKILL
    res = train(config, out)
    assert res.exit_code == 0, res.output


@pytest.mark.e2e
def test_the_lock_is_held_for_the_whole_run_and_released_after(quick, tmp_path):
    from tunelab.config import load_config
    from tunelab.run import run_training

    config, _ = quick
    out = tmp_path / "run"
    seen = []

    def should_stop():  # called by the loop at every step, inside the run
        seen.append(RunLock(out).holder())
        return False

    run_training(load_config(config), out, show_progress=False, should_stop=should_stop)
    assert seen and all(h is not None and f"pid {os.getpid()} " in h for h in seen)
    assert RunLock(out).holder() is None


@pytest.mark.unit
def test_retention_removes_only_its_own_or_dead_temp_folders(tmp_path):
    from tunelab.train.checkpoint import apply_retention

    root = tmp_path / "checkpoints"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        for name in (f".tmp-step-000004.pid{sleeper.pid}", f".tmp-step-000002.pid{dead.pid}",
                     f".tmp-step-000006.pid{os.getpid()}"):
            (root / name).mkdir(parents=True)
        apply_retention(root, keep_last=1, keep=set())
        assert sorted(p.name for p in root.iterdir()) == [f".tmp-step-000004.pid{sleeper.pid}"]
    finally:
        sleeper.kill()
        sleeper.wait()


# ---------------------------------------------------------------- disk full


def _enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("where", ["safetensors", "torch_save"])
@pytest.mark.e2e
def test_disk_full_in_a_checkpoint_names_the_intact_one_and_how_to_resume(quick, tmp_path, monkeypatch, where):
    """torch and safetensors report ENOSPC in their own words; the line is the same either way."""
    import torch

    import tunelab.train.checkpoint as ckpt

    config, _ = quick
    out = tmp_path / "run"
    calls = {"n": 0}
    real = ckpt.save_file if where == "safetensors" else torch.save

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] > (1 if where == "safetensors" else 3):  # the second checkpoint fails
            if where == "safetensors":
                from safetensors import SafetensorError

                raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                      "message: \"No space left on device\" })")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing "
                               "file data/0: file write failed")
        return real(*a, **k)

    monkeypatch.setattr(ckpt, "save_file", flaky) if where == "safetensors" else monkeypatch.setattr(torch, "save", flaky)
    res = train(config, out)
    line = assert_one_error(res, 1, r"error: disk full while writing checkpoint step-000004 in .*intact: checkpoint "
                                    r"step-000002 and metrics.jsonl up to it; free space, then rerun .*--resume auto")
    assert "internal error" not in line
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000002"]  # no temp folder left
    from tunelab.train.checkpoint import verify

    assert verify(ckpts / "step-000002") is None
    monkeypatch.undo()
    res = train(config, out, "--resume", "auto")
    assert res.exit_code == 0, res.output
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]


@pytest.mark.e2e
def test_disk_full_in_metrics_jsonl_leaves_only_whole_rows(quick, tmp_path, monkeypatch):
    """A row cut halfway by ENOSPC is cut back out of the file; the run resumes without hand-editing."""
    import tunelab.monitor.metrics_log as ml

    config, _ = quick
    out = tmp_path / "run"
    real_write, calls = os.write, {"n": 0}

    def half_then_enospc(fd, data):
        if fd > 2 and data.startswith(b"{") and b'"step": 5' in data:  # the 5th step's row
            calls["n"] += 1
            real_write(fd, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(ml.os, "write", half_then_enospc)
    res = train(config, out)
    monkeypatch.undo()
    assert calls["n"] == 1
    assert_one_error(res, 1, r"disk full while writing metrics.jsonl .*intact: checkpoint step-000004")
    text = (out / "metrics.jsonl").read_text()
    assert text.endswith("\n") and all(json.loads(line) for line in text.splitlines())
    res = train(config, out, "--resume", "auto")
    assert res.exit_code == 0, res.output


@pytest.mark.unit
def test_metrics_log_on_a_real_full_device_raises_enospc_and_writes_nothing(tmp_path):
    """/dev/full answers every write with a real ENOSPC."""
    from tunelab.monitor.metrics_log import MetricsLog

    log = MetricsLog(Path("/dev/full"))
    with pytest.raises(OSError) as info:
        log.write({"step": 1, "loss": 0.5})
    assert info.value.errno == errno.ENOSPC
    log.close()


@pytest.mark.parametrize("what", ["final", "summary", "report"])
@pytest.mark.e2e
def test_disk_full_at_the_end_of_a_run_says_what_is_intact(quick, tmp_path, monkeypatch, what):
    config, _ = quick
    out = tmp_path / "run"
    if what == "final":
        from transformers import PreTrainedModel

        monkeypatch.setattr(PreTrainedModel, "save_pretrained", _enospc)
        pattern = r"disk full while writing final/ .*intact: checkpoint step-000006"
    elif what == "summary":
        import tunelab.run_dir as rd

        monkeypatch.setattr(rd, "write_atomic", _enospc)
        pattern = r"disk full while writing summary.json .*intact: checkpoint step-000006"
    else:
        import tunelab.analysis.report as report

        monkeypatch.setattr(report, "write_atomic", _enospc)
        pattern = r"disk full while writing report.html .*final/ and summary.json are intact; free space, then `tunelab report"
    res = train(config, out)
    assert_one_error(res, 1, pattern)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp") or ".tmp-" in p.name]


@pytest.mark.unit
def test_write_atomic_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    import tunelab.durable as durable

    target = tmp_path / "summary.json"
    durable.write_atomic(target, '{"status": "running"}')
    monkeypatch.setattr(durable.os, "fsync", _enospc)
    with pytest.raises(OSError):
        durable.write_atomic(target, '{"status": "completed"}')
    assert json.loads(target.read_text()) == {"status": "running"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    try:
        return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.e2e
def test_a_real_full_tmpfs_ends_with_one_line_and_resumes_after_space_is_freed(quick, tmp_path):
    config, _ = quick
    mnt = tmp_path / "small"
    if os.geteuid() != 0 or not _mount_tmpfs(mnt, "700k"):
        pytest.skip("cannot mount a tmpfs here")
    try:
        out = mnt / "run"
        res = train(config, out)
        assert_one_error(res, 1, r"error: disk full while writing .* \(No space left on device\); "
                                 r"(intact: checkpoint step-0000\d\d and metrics.jsonl up to it|no checkpoint was written yet)")
        assert not any(".tmp-" in p.name for p in out.rglob("*"))
        from tunelab.train.checkpoint import find_resumable

        intact, _ = find_resumable(out / "checkpoints")
        assert intact is not None
        subprocess.run(["mount", "-o", "remount,size=16m", str(mnt)], check=True, timeout=20)
        res = train(config, out, "--resume", "auto")
        assert res.exit_code == 0, res.output
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=20)


# ---------------------------------------------------------------- torn metrics.jsonl and resume checks


@pytest.mark.e2e
def test_a_torn_last_metrics_line_is_cut_on_resume_and_said(quick, tmp_path, caplog):
    from conftest import stop_after

    from tunelab.config import load_config
    from tunelab.run import run_training

    config, _ = quick
    out = tmp_path / "run"
    summary = run_training(load_config(config), out, show_progress=False, should_stop=stop_after(3))
    assert summary["status"] == "interrupted"
    with open(out / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 4, "epoch": 0.5, "lo')  # a kill or a full disk in the middle of an append
    res = train(config, out, "--resume", "auto")
    assert res.exit_code == 0, res.output
    assert "cut a torn last line" in res.stderr + caplog.text
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("change, key", [({"method": "lora"}, "method"), ({"train": {"seed": 9}}, "train.seed"),
                                          ({"model": {"name": "other-model"}}, "model.name")])
@pytest.mark.e2e
def test_resume_under_another_config_is_refused_naming_the_difference(quick, tmp_path, change, key):
    from conftest import stop_after

    from tunelab.config import load_config
    from tunelab.run import run_training

    config, folder = quick
    out = tmp_path / "run"
    run_training(load_config(config), out, show_progress=False, should_stop=stop_after(2))
    cfg = yaml.safe_load(config.read_text())
    for section, value in change.items():
        cfg[section] = {**cfg[section], **value} if isinstance(value, dict) else value
    if key == "model.name":
        (folder / "other-model").mkdir()
        cfg["model"]["name"] = str(folder / "other-model")
    before = sorted((p.name, p.stat().st_size) for p in out.rglob("*") if p.is_file() and p.name != ".lock")
    res = train(write_config(folder, cfg, "changed.yaml"), out, "--resume", "auto")
    assert_one_error(res, 2, rf"field '{re.escape(key)}': cannot resume: this run was trained with {re.escape(key)} = ")
    assert sorted((p.name, p.stat().st_size) for p in out.rglob("*") if p.is_file() and p.name != ".lock") == before


class NotATensor:
    """An object that weights_only refuses to unpickle (a checkpoint not written by tunelab)."""


def _bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.mark.parametrize("refusal", ["required_logger", "pickled_object"])
@pytest.mark.e2e
def test_a_refused_resume_leaves_the_run_dir_byte_identical(quick, tmp_path, monkeypatch, refusal):
    """Both refusals come after setup, where open_run used to have trimmed metrics.jsonl already."""
    import types

    import torch
    from conftest import stop_after

    from tunelab.config import load_config
    from tunelab.run import run_training
    from tunelab.train import checkpoint as ckpt

    config, folder = quick
    out = tmp_path / "run"
    assert run_training(load_config(config), out, show_progress=False, should_stop=stop_after(3))["status"] == "interrupted"
    shutil.rmtree(out / "checkpoints" / ckpt.checkpoint_name(3))  # the resume goes back to step 2 ...
    assert any(json.loads(line).get("step") == 3 for line in (out / "metrics.jsonl").read_text().splitlines())
    # ... so it would trim step 3's rows, and tensorboard would add an event file
    if refusal == "required_logger":
        def start_run(run_id=None, run_name=None):
            raise ConnectionError("tracking server unreachable at http://mlflow:5000")

        monkeypatch.setitem(sys.modules, "mlflow", types.SimpleNamespace(set_experiment=lambda name: None,
                                                                         start_run=start_run))
        cfg = yaml.safe_load(config.read_text())
        cfg["monitor"] = {"loggers": ["tensorboard", "mlflow"], "loggers_required": True}
        config, pattern = write_config(folder, cfg, "loggers.yaml"), r"monitor.loggers.*loggers_required"
    else:
        step2 = out / "checkpoints" / ckpt.checkpoint_name(2)
        torch.save({"lr_lambdas": [NotATensor()]}, step2 / "scheduler.pt")
        manifest = json.loads((step2 / ckpt.MANIFEST).read_text())  # sealed again: only weights_only refuses it
        manifest["files"]["scheduler.pt"] = {"bytes": (step2 / "scheduler.pt").stat().st_size,
                                             "sha256": ckpt._sha256(step2 / "scheduler.pt")}
        (step2 / ckpt.MANIFEST).write_text(json.dumps(manifest))
        assert ckpt.verify(step2) is None
        pattern = "objects other than tensors and numbers"
    before, folders = _bytes(out), sorted(p for p in out.rglob("*") if p.is_dir())
    res = train(config, out, "--resume", "auto")
    assert_one_error(res, 2, pattern)
    assert _bytes(out) == before and sorted(p for p in out.rglob("*") if p.is_dir()) == folders


@pytest.mark.e2e
def test_a_damaged_summary_json_is_an_input_error(quick, tmp_path):
    config, _ = quick
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "summary.json").write_text('{"status": "compl')
    assert_one_error(train(config, out, "--resume", "auto"), 2, r"summary.json: summary.json is damaged")


# ---------------------------------------------------------------- diagnoses


@pytest.mark.e2e
def test_nonfinite_losses_name_their_rows_and_only_an_existing_checkpoint(toy_classification, tmp_path, monkeypatch):
    """Rows holding an unknown word give a NaN loss (patched loss); the diverged line names their
    file:line, and says no checkpoint exists when none was saved before the fault."""
    import tunelab.tasks.classification as cls

    folder = toy_classification["dir"]
    rows = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]
    for i in range(len(rows)):
        rows[i]["text"] += " zzzq"  # every row: [UNK] (id 1) everywhere, so every step is NaN
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    real = cls.classification_loss

    def nan_on_unknown(model, batch):
        loss, n = real(model, batch)
        return (loss * float("nan"), n) if bool((batch["input_ids"] == 1).any()) else (loss, n)

    monkeypatch.setattr(cls, "classification_loss", nan_on_unknown)
    cfg = toy_classification["config"]
    cfg["train"].update({"max_steps": 8, "batch_size": 2})
    res = train(write_config(folder, cfg), tmp_path / "run")
    assert res.exit_code == 1, res.output
    line = res.stderr.strip().splitlines()[-1]
    assert re.search(r"training diverged: 5 steps had NaN/Inf loss or gradients; the non-finite steps came from "
                     r"train.jsonl:\d+", line), line
    assert "no checkpoint was saved before the fault" in line and "checkpoints" not in line
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["last_good_checkpoint"] is None and len(summary["nonfinite_examples"]) == 10
    events = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("event") == "nonfinite_step"] == [1, 2, 3, 4, 5]
