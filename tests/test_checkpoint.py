"""Checkpoints: atomic, verified by checksum, retention that keeps best + last, NaN never saved."""

import json

import pytest
import torch

from tunelab.train import checkpoint as ckpt


def setup():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model[0].weight.requires_grad = False  # frozen: must not be stored
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    sched.step()
    return model, opt, sched


def save(root, step, model, opt, sched):
    return ckpt.save_checkpoint(root, step=step, model=model, optimizer=opt, scheduler=sched, state={"loop": {"step": step}})


@pytest.mark.unit
def test_round_trip_restores_weights_optimizer_scheduler_rng(tmp_path):
    model, opt, sched = setup()
    path = save(tmp_path, 7, model, opt, sched)
    assert ckpt.verify(path) is None
    from safetensors.torch import load_file

    assert "0.weight" not in load_file(str(path / "weights.safetensors"))
    expected_next = torch.rand(3)
    m2, o2, s2 = setup()
    with torch.no_grad():
        for p in m2.parameters():
            p.add_(1.0)
    state = ckpt.load_checkpoint(path, model=m2, optimizer=o2, scheduler=s2)
    assert state == {"loop": {"step": 7}}
    for (n, a), b in zip(model.state_dict().items(), m2.state_dict().values()):
        if n != "0.weight":
            assert torch.equal(a, b), n
    assert o2.state_dict()["state"][0]["exp_avg"].equal(opt.state_dict()["state"][0]["exp_avg"])
    assert s2.last_epoch == sched.last_epoch
    assert torch.equal(torch.rand(3), expected_next)  # RNG restored to the moment of saving


@pytest.mark.unit
def test_corruption_is_detected_and_resume_falls_back(tmp_path):
    model, opt, sched = setup()
    save(tmp_path, 1, model, opt, sched)
    p2 = save(tmp_path, 2, model, opt, sched)
    raw = bytearray((p2 / "optimizer.pt").read_bytes())
    raw[-10] ^= 0xFF
    (p2 / "optimizer.pt").write_bytes(bytes(raw))
    (tmp_path / ".tmp-step-000003").mkdir()
    path, skipped = ckpt.find_resumable(tmp_path)
    assert path.name == "step-000001"
    assert any("step-000002" in s and "checksum" in s for s in skipped)
    assert any("incomplete" in s for s in skipped)


@pytest.mark.unit
def test_failed_save_keeps_previous_and_leaves_no_temp(tmp_path, monkeypatch):
    model, opt, sched = setup()
    good = save(tmp_path, 1, model, opt, sched)
    real_save = torch.save

    def disk_full(obj, f, *a, **k):
        if str(f).endswith("scheduler.pt"):
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError):
        save(tmp_path, 2, model, opt, sched)
    assert ckpt.verify(good) is None
    assert [p.name for p in tmp_path.iterdir()] == ["step-000001"]


@pytest.mark.unit
def test_nan_weights_are_never_saved(tmp_path):
    model, opt, sched = setup()
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError):
        save(tmp_path, 1, model, opt, sched)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.unit
def test_retention_keeps_best_and_last(tmp_path):
    model, opt, sched = setup()
    for step in (1, 2, 3, 4, 5):
        save(tmp_path, step, model, opt, sched)
    removed = ckpt.apply_retention(tmp_path, keep_last=2, keep={"step-000002"})
    assert sorted(removed) == ["step-000001", "step-000003"]
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000002", "step-000004", "step-000005"]
    manifest = json.loads((tmp_path / "step-000005" / "manifest.json").read_text())
    assert set(manifest["files"]) == {"weights.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "state.json"}


@pytest.mark.e2e
def test_disk_full_during_a_run_is_a_clear_failure_and_resumable(toy_classification, tmp_path, monkeypatch):
    import copy

    from tunelab.config import Config
    from tunelab.errors import RunFailure
    from tunelab.run import run_training

    raw = copy.deepcopy(toy_classification["config"])
    raw["checkpoint"] = {"save_every": 4, "keep_last": 3}
    real_save, calls = torch.save, {"n": 0}

    def fills_up(obj, f, *a, **k):
        if str(f).endswith("optimizer.pt"):
            calls["n"] += 1
            if calls["n"] == 2:  # the second checkpoint's save hits a full disk
                raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", fills_up)
    with pytest.raises(RunFailure, match=r"checkpoint step-000008 in .* \(No space left on device\); intact: checkpoint step-000004 and"):
        run_training(Config.model_validate(raw), tmp_path / "run", show_progress=False)
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-000004"]
    assert ckpt.verify(tmp_path / "run" / "checkpoints" / "step-000004") is None
    monkeypatch.setattr(torch, "save", real_save)
    s = run_training(Config.model_validate(raw), tmp_path / "run", resume="auto", show_progress=False)
    assert s["status"] == "completed" and s["steps"] == 16


@pytest.mark.e2e
def test_nan_loss_stops_cleanly_with_the_last_good_checkpoint(toy_classification, tmp_path, monkeypatch):
    """From step 7 on the loss is NaN: steps are skipped and counted, the run stops after 5 in a row
    with a diagnosis, and the checkpoint saved before the fault is intact and finite."""
    import copy

    from typer.testing import CliRunner
    import yaml

    import tunelab.tasks.classification as clf
    from tunelab.cli import app

    real_loss, calls = clf.classification_loss, {"n": 0}

    def poisoned(model, batch):
        calls["n"] += 1
        loss, n = real_loss(model, batch)
        return (loss * float("nan"), n) if calls["n"] > 6 else (loss, n)

    monkeypatch.setattr(clf, "classification_loss", poisoned)
    raw = copy.deepcopy(toy_classification["config"])
    raw["checkpoint"] = {"save_every": 3, "keep_last": 2}
    raw["train"].update({"epochs": 4, "log_every": 1})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    res = CliRunner().invoke(app, ["train", str(tmp_path / "c.yaml"), "-o", str(tmp_path / "run"), "--no-progress"])
    assert res.exit_code == 1
    assert "diverged" in res.stderr and "NaN/Inf" in res.stderr and "lower optim.lr" in res.stderr
    summary = __import__("json").loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["skipped_steps"] == 5 and summary["steps"] == 11
    assert not (tmp_path / "run" / "final").exists()
    good, _ = ckpt.find_resumable(tmp_path / "run" / "checkpoints")
    assert good.name == "step-000006"  # saved before the first NaN step; none after it
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(str(good / "weights.safetensors")).values())


@pytest.mark.parametrize("auto_batch", [False, True])
@pytest.mark.e2e
def test_out_of_memory_names_the_fixes_or_halves_the_batch(toy_classification, tmp_path, monkeypatch, auto_batch):
    import copy
    import json

    import tunelab.tasks.classification as clf
    from tunelab.config import Config
    from tunelab.errors import OutOfMemory
    from tunelab.run import run_training

    real_loss, big = clf.classification_loss, {"n": 0}

    def small_memory(model, batch):
        if len(batch["labels"]) > 4:  # a micro-batch over 4 rows does not fit
            big["n"] += 1
            if big["n"] > 3:  # the first three fit (a checkpoint is written at step 3)
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_loss(model, batch)

    monkeypatch.setattr(clf, "classification_loss", small_memory)
    raw = copy.deepcopy(toy_classification["config"])
    raw["train"].update({"auto_batch": auto_batch, "batch_size": 8})
    raw["checkpoint"] = {"save_every": 3}
    cfg = Config.model_validate(raw)
    if not auto_batch:
        with pytest.raises(OutOfMemory, match="lower train.batch_size and raise train.grad_accum"):
            run_training(cfg, tmp_path / "run", show_progress=False)
        return
    s = run_training(cfg, tmp_path / "run", show_progress=False)
    assert s["status"] == "completed" and s["steps"] == 16  # same effective batch: same number of steps
    assert s["auto_batch"] == [{"batch_size": 4, "grad_accum": 2, "from_checkpoint": "step-000003"}]
    import yaml

    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert resolved["train"]["batch_size"] == 4 and resolved["train"]["grad_accum"] == 2
    steps = [json.loads(l)["step"] for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert steps == sorted(steps) and len(steps) == len(set(steps))
