"""Loggers and live health diagnosis through real (tiny) training runs."""

import copy
import json
import sys
import types
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import stop_after
from tunelab.cli import app
from tunelab.config import Config
from tunelab.monitor.metrics_log import read_metrics
from tunelab.run import run_training

pytestmark = pytest.mark.e2e


def scalars(run: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def column(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in rows if key in r]


def health_rows(run: Path) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if r.get("event") == "health"]


def test_tensorboard_holds_the_metrics_and_a_normal_run_has_no_health_events(toy_classification, tmp_path):
    """The run of test_cli_train's contract test (6 epochs, eval every 8 steps: it learns), with
    TensorBoard on: every scalar equals its metrics.jsonl value at the same optimizer step, and the
    health monitor, which has 24 train rows and 7 evaluations to look at, says nothing."""
    raw = copy.deepcopy(toy_classification["config"])
    raw["train"].update({"epochs": 6, "eval_every": 8})
    raw["monitor"] = {"loggers": ["tensorboard"]}
    out = tmp_path / "run"
    summary = run_training(Config.model_validate(raw), out, show_progress=False)
    assert summary["status"] == "completed" and summary["final"]["accuracy"] >= 0.75
    rows = read_metrics(out / "metrics.jsonl")
    for key in ("loss", "lr", "grad_norm"):
        logged, jsonl = scalars(out, f"train/{key}"), column(rows, key)
        assert [s for s, _ in logged] == [s for s, _ in jsonl] == list(range(2, 49, 2))
        assert [v for _, v in logged] == pytest.approx([v for _, v in jsonl], rel=1e-6)  # float32 in the event file
    logged, jsonl = scalars(out, "eval/accuracy"), column(rows, "eval_accuracy")
    assert [s for s, _ in logged] == [s for s, _ in jsonl] == [0, 8, 16, 24, 32, 40, 48]
    assert [v for _, v in logged] == pytest.approx([v for _, v in jsonl], rel=1e-6)
    assert [s for s, _ in scalars(out, "eval/loss")] == [0, 8, 16, 24, 32, 40, 48]

    assert health_rows(out) == []
    assert summary["health"] == {"events": 0, "counts": {}, "first_step": {}, "messages": [], "messages_left_out": 0}
    assert "no health events" in (out / "report.html").read_text()


def test_tensorboard_after_a_resume_has_no_duplicate_steps(toy_classification, tmp_path):
    """Killed at step 7 after logging steps 2, 4, 6, resumed from the checkpoint at step 4: step 6
    is logged again. Without purging, TensorBoard would show step 6 twice (6 is not out of order
    after 6, so its reader would keep both); with purge_step = 5 each step appears once, with the
    values of the final metrics.jsonl."""
    raw = copy.deepcopy(toy_classification["config"])
    raw["monitor"] = {"loggers": ["tensorboard"]}
    raw["checkpoint"] = {"save_every": 2, "keep_last": 10, "final": "last"}
    out = tmp_path / "run"
    cut = run_training(Config.model_validate(raw), out, show_progress=False, should_stop=stop_after(7))
    assert cut["status"] == "interrupted" and [s for s, _ in scalars(out, "train/loss")] == [2, 4, 6]
    resumed = run_training(Config.model_validate(raw), out, resume=str(out / "checkpoints" / "step-000004"),
                           show_progress=False)
    assert resumed["status"] == "completed"
    rows = read_metrics(out / "metrics.jsonl")
    logged, jsonl = scalars(out, "train/loss"), column(rows, "loss")
    assert [s for s, _ in logged] == [s for s, _ in jsonl] == list(range(2, 17, 2))
    assert [v for _, v in logged] == pytest.approx([v for _, v in jsonl], rel=1e-6)
    assert [s for s, _ in scalars(out, "eval/loss")] == [0, 8, 16]
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2


def test_an_absurd_lr_is_diagnosed_and_the_diagnosis_survives_a_resume(toy_classification, tmp_path):
    """optim.lr=5 on the tiny BERT: the loss jumps from ~0.7 to tens within the first logs, so
    lr_too_high is flagged (metrics.jsonl, summary.json, report.html, TensorBoard). Stopped at step 2,
    before the flag, and resumed, the run's health rows are exactly the uninterrupted run's: the
    monitor is rebuilt from metrics.jsonl, so it still measures the rise from the first two rows (a
    fresh monitor would measure from the already-high losses after step 2, and flag later or never)."""
    raw = copy.deepcopy(toy_classification["config"])
    raw["optim"]["lr"] = 5
    raw["train"]["log_every"] = 1
    raw["monitor"] = {"loggers": ["tensorboard"]}
    raw["checkpoint"] = {"save_every": 1, "final": "last"}
    full = run_training(Config.model_validate(raw), tmp_path / "full", show_progress=False)
    events = health_rows(tmp_path / "full")
    assert events and events[0]["kind"] == "lr_too_high" and "optim.lr" in events[0]["message"]
    assert all(set(e) == {"step", "event", "kind", "message"} for e in events)
    assert full["health"]["events"] == len(events) and full["health"]["counts"]["lr_too_high"] == 1
    assert 2 < full["health"]["first_step"]["lr_too_high"] == events[0]["step"] <= 10
    page = (tmp_path / "full" / "report.html").read_text()
    assert "training health" in page and "lr_too_high" in page
    assert [s for s, _ in scalars(tmp_path / "full", "health/lr_too_high")] == [events[0]["step"]]

    run_training(Config.model_validate(raw), tmp_path / "cut", show_progress=False, should_stop=stop_after(2))
    resumed = run_training(Config.model_validate(raw), tmp_path / "cut", resume="auto", show_progress=False)
    assert health_rows(tmp_path / "cut") == events
    assert resumed["health"] == full["health"]


def test_non_finite_gradients_are_flagged_before_the_loop_stops_the_run(toy_classification, tmp_path, monkeypatch):
    """From the 7th step on the gradient norm is NaN (the loss stays finite): the loop skips those
    steps and stops after 5 in a row, at 11. The monitor warns at the first skipped step, 7, from
    the grown skipped_steps count; both `event` rows sit in metrics.jsonl among the loss rows."""
    import torch

    real_clip, calls = torch.nn.utils.clip_grad_norm_, iter(range(1, 1000))
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda params, max_norm: real_clip(params, max_norm) * (float("nan") if next(calls) > 6 else 1.0))
    raw = copy.deepcopy(toy_classification["config"])
    raw["train"].update({"epochs": 4, "log_every": 1})
    summary = run_training(Config.model_validate(raw), tmp_path / "run", show_progress=False)
    assert summary["status"] == "diverged" and summary["steps"] == 11 and summary["skipped_steps"] == 5
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    # each skipped step also leaves a row naming the examples that produced it (issue 13)
    assert [r["step"] for r in rows if r.get("event") == "nonfinite_step"] == [7, 8, 9, 10, 11]
    assert all(r["examples"] for r in rows if r.get("event") == "nonfinite_step")
    events = [(r["step"], r["event"], r.get("kind")) for r in rows if "event" in r and r["event"] != "nonfinite_step"]
    assert events == [(7, "health", "divergence_risk"), (11, "diverged", None)]
    assert summary["health"]["counts"] == {"divergence_risk": 1}
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 11))


class FakeRemote:
    """Stands in for the wandb and mlflow modules (neither is installed here, nor reachable)."""

    def __init__(self):
        self.calls = []

    def wandb_module(self):
        fake = self

        class Run:
            def log(self, data, step):
                fake.calls.append(("wandb.log", step, data))

            def finish(self):
                fake.calls.append(("wandb.finish",))

        def init(**kwargs):
            fake.calls.append(("wandb.init", kwargs))
            return Run()

        return types.SimpleNamespace(init=init)

    def mlflow_module(self):
        fake, active = self, {}

        def start_run(run_id=None, run_name=None):
            active["id"] = run_id or "mlflow-run-1"
            fake.calls.append(("mlflow.start_run", run_id, run_name))

        return types.SimpleNamespace(
            set_experiment=lambda name: fake.calls.append(("mlflow.set_experiment", name)),
            start_run=start_run,
            active_run=lambda: types.SimpleNamespace(info=types.SimpleNamespace(run_id=active["id"])),
            log_params=lambda params: fake.calls.append(("mlflow.log_params", params)),
            log_metrics=lambda values, step: fake.calls.append(("mlflow.log_metrics", step, values)),
            end_run=lambda: fake.calls.append(("mlflow.end_run",)),
        )

    def named(self, name):
        return [c for c in self.calls if c[0] == name]


def test_wandb_and_mlflow_get_every_row_continue_their_run_on_resume_and_no_secret_reaches_the_run_dir(
        toy_classification, tmp_path, monkeypatch):
    fake = FakeRemote()
    monkeypatch.setitem(sys.modules, "wandb", fake.wandb_module())
    monkeypatch.setitem(sys.modules, "mlflow", fake.mlflow_module())
    secret = "wandb-key-3f9a1c77e0"
    monkeypatch.setenv("WANDB_API_KEY", secret)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", secret + "-mlflow")
    raw = copy.deepcopy(toy_classification["config"])
    raw["monitor"] = {"loggers": ["wandb", "mlflow"], "project": "toy"}
    out = tmp_path / "run"
    run_training(Config.model_validate(raw), out, show_progress=False, should_stop=stop_after(5))
    run_training(Config.model_validate(raw), out, resume="auto", show_progress=False)

    inits = fake.named("wandb.init")
    assert len(inits) == 2 and inits[0][1]["id"] == inits[1][1]["id"] and inits[1][1]["resume"] == "allow"
    assert inits[0][1]["project"] == "toy" and inits[0][1]["name"] == "run"
    assert inits[0][1]["config"]["optim"]["lr"] == pytest.approx(3e-3)
    assert fake.named("mlflow.start_run") == [("mlflow.start_run", None, "run"), ("mlflow.start_run", "mlflow-run-1", None)]
    assert len(fake.named("mlflow.log_params")) == 1  # MLflow params are write-once
    assert len(fake.named("wandb.finish")) == len(fake.named("mlflow.end_run")) == 2
    assert json.loads((out / "loggers.json").read_text()) == {"wandb": inits[0][1]["id"], "mlflow": "mlflow-run-1"}

    rows = read_metrics(out / "metrics.jsonl")
    train_losses = column(rows, "loss")
    assert [(c[1], c[2]["train/loss"]) for c in fake.named("wandb.log") if "train/loss" in c[2]] == train_losses
    assert [(c[1], c[2]["train/loss"]) for c in fake.named("mlflow.log_metrics") if "train/loss" in c[2]] == train_losses
    assert [c[1] for c in fake.named("wandb.log") if "eval/accuracy" in c[2]] == [0, 8, 16]

    for path in out.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_a_logger_whose_package_is_missing_is_one_line_naming_the_key(toy_classification, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # not importable, whatever this machine has
    cfg = toy_classification["dir"] / "config.yaml"
    cfg.write_text(yaml.safe_dump(toy_classification["config"]))
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", str(cfg), "-o", str(out), "--set", "monitor.loggers=[tensorboard, mlflow]"])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.output
    assert "monitor.loggers" in lines[0] and "pip install mlflow" in lines[0] and "--set" in lines[0]
    assert not out.exists()
    res = CliRunner().invoke(app, ["train", str(cfg), "-o", str(out), "--set", "monitor.loggers=[neptune]"])
    assert res.exit_code == 2 and "monitor.loggers" in res.stderr and not out.exists()


@pytest.mark.parametrize("fails_at", ["start", "step 6"])
def test_a_failing_tracking_server_never_costs_the_run(toy_classification, tmp_path, monkeypatch, fails_at):
    """MLflow raising at start_run (no server) or at a log call mid-run: the run completes,
    metrics.jsonl keeps every row, one warning says the logger is gone."""
    import logging

    fake = FakeRemote()
    module = fake.mlflow_module()
    if fails_at == "start":
        def start_run(run_id=None, run_name=None):
            raise ConnectionError("tracking server unreachable")
        module.start_run = start_run
    else:
        def log_metrics(values, step):
            if step >= 6:
                raise ConnectionError("tracking server unreachable")
            fake.calls.append(("mlflow.log_metrics", step, values))
        module.log_metrics = log_metrics
    monkeypatch.setitem(sys.modules, "mlflow", module)
    raw = copy.deepcopy(toy_classification["config"])
    raw["monitor"] = {"loggers": ["mlflow"]}
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("tunelab").addHandler(handler)
    try:
        summary = run_training(Config.model_validate(raw), tmp_path / "run", show_progress=False)
    finally:
        logging.getLogger("tunelab").removeHandler(handler)
    assert summary["status"] == "completed"
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == list(range(2, 17, 2))
    warned = [r.getMessage() for r in records if "unreachable" in r.getMessage()]
    assert len(warned) == 1
