"""Where metrics rows go besides metrics.jsonl: TensorBoard, Weights & Biases, MLflow.

A logger is anything with `log(row)` and `close()`. `RunDir.log` hands every metrics.jsonl row to
the loggers that `monitor.loggers` names, so the loop never knows they exist. Every backend gets
the same scalars under the same names, with the optimizer step as x: train/loss, train/lr,
train/grad_norm, eval/<metric>, and health/<kind> = 1 where a health event fired (TensorBoard also
gets its message as text).

Credentials never pass through tunelab: W&B reads WANDB_API_KEY and MLflow MLFLOW_TRACKING_URI /
MLFLOW_TRACKING_TOKEN from the environment themselves, W&B keeps its own files outside the run dir
(./wandb or WANDB_DIR), and nothing here writes the environment anywhere. The run dir holds only
`loggers.json`: the W&B / MLflow run ids, so a resume continues the same remote run.

Resume: TensorBoard reopens its folder with `purge_step` = the resumed step + 1, so steps a killed
run logged after its last checkpoint are hidden and logged again without duplicates. W&B ignores
steps at or below its last one (a deterministic resume logs the same values there anyway); MLflow
keeps every value it is sent, so such steps appear twice in its history.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import uuid
from pathlib import Path
from typing import Protocol

from tunelab.errors import InputError

log = logging.getLogger("tunelab")

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


class Logger(Protocol):
    def log(self, row: dict) -> None: ...
    def close(self) -> None: ...


def scalars(row: dict) -> dict[str, float]:
    """A metrics row as named scalars; the same names for every backend."""
    if row.get("event") == "health":
        return {f"health/{row['kind']}": 1.0}
    if "event" in row:
        return {}
    if "loss" in row:
        named = {f"train/{k}": row.get(k) for k in ("loss", "lr", "grad_norm")}
    else:
        named = {f"eval/{k.removeprefix('eval_')}": v for k, v in row.items() if k.startswith("eval_")}
    return {k: float(v) for k, v in named.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class TensorBoardLogger:
    """Event files in RUN/tensorboard/ (`tensorboard --logdir RUN/tensorboard`)."""

    def __init__(self, log_dir: Path, purge_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step, flush_secs=30)

    def log(self, row: dict) -> None:
        step = int(row.get("step", 0))
        for name, value in scalars(row).items():
            self.writer.add_scalar(name, value, global_step=step)
        if row.get("event") == "health":
            self.writer.add_text(f"health/{row['kind']}", row["message"], global_step=step)

    def close(self) -> None:
        self.writer.close()


class ScalarLogger:
    """A backend that takes a dict of scalars and a step (W&B, MLflow): `send(values, step=)`, `finish()`."""

    def __init__(self, send, finish):
        self.send, self.finish = send, finish

    def log(self, row: dict) -> None:
        values = scalars(row)
        if values:
            self.send(values, step=int(row.get("step", 0)))

    def close(self) -> None:
        self.finish()


def wandb_logger(run_id: str, project: str, name: str, config: dict) -> ScalarLogger:
    import wandb

    run = wandb.init(project=project, name=name, id=run_id, resume="allow", config=config)
    return ScalarLogger(run.log, run.finish)


def mlflow_logger(run_id: str | None, experiment: str, name: str, config: dict) -> tuple[ScalarLogger, str]:
    """The logger and its MLflow run id (new, or `run_id` continued)."""
    import mlflow

    mlflow.set_experiment(experiment)
    mlflow.start_run(run_id=run_id, run_name=None if run_id else name)
    if run_id is None:  # params are write-once in MLflow: a resumed run keeps the first ones
        mlflow.log_params(_flat(config))
    return ScalarLogger(mlflow.log_metrics, mlflow.end_run), mlflow.active_run().info.run_id


def _flat(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)[:250]
    return out


def check_loggers(names: list[str]) -> None:
    """Fail at setup, before any run dir exists, when a named logger's package is not installed."""
    for name in dict.fromkeys(names):
        try:
            importlib.import_module(PACKAGES[name])
        except ImportError:
            raise InputError(f"logger '{name}' needs the {PACKAGES[name]} package: pip install {PACKAGES[name]} "
                             "(or remove it from the list)", field="monitor.loggers") from None


def reason(e: BaseException) -> str:
    """An exception as one short line (its first line, or its type)."""
    text = str(e).splitlines()[0].strip() if str(e).strip() else ""
    return text[:200] or type(e).__name__


class LoggerSet:
    """The run's loggers by name, and what became of each: `status[name]` is "ok" or "failed: reason".

    A logger that fails mid-run is dropped with one warning; metrics.jsonl keeps every row. The
    status goes into summary.json (`loggers`), the final line and the report, so a run whose
    tracking died is not mistaken for a tracked one.
    """

    def __init__(self):
        self.active: dict[str, Logger] = {}
        self.status: dict[str, str] = {}

    def add(self, name: str, logger: Logger) -> None:
        self.active[name] = logger
        self.status[name] = "ok"

    def failed(self, name: str, why: str) -> None:
        self.active.pop(name, None)
        self.status[name] = f"failed: {why}"

    def log(self, row: dict) -> None:
        for name, logger in list(self.active.items()):
            try:
                logger.log(row)
            except Exception as e:  # a tracking server's error must never cost the run
                log.warning("logger %s failed and is dropped (metrics.jsonl keeps every row): %s", name, reason(e))
                self.failed(name, reason(e))

    def close(self) -> None:
        for name, logger in list(self.active.items()):
            try:
                logger.close()
            except Exception as e:
                log.warning("logger %s failed at close (its last rows may be missing there): %s", name, reason(e))
                self.failed(name, f"at close: {reason(e)}")
        self.active = {}

    def __len__(self) -> int:
        return len(self.active)


def open_loggers(monitor, root: Path, config: dict, resumed_step: int | None) -> LoggerSet:
    """The loggers `monitor.loggers` names (a `MonitorConfig`), for a new run or one resumed at `resumed_step`.

    `config` is the resolved config as plain data (what W&B / MLflow record with the run). A logger
    that cannot start is recorded as failed and training goes on, unless `monitor.loggers_required`
    is set: then it is an input error before training starts (the ones already started are closed).
    """
    ids_path = root / "loggers.json"
    ids = json.loads(ids_path.read_text()) if resumed_step is not None and ids_path.is_file() else {}
    project, name = monitor.project or "tunelab", monitor.run_name or root.name
    loggers = LoggerSet()
    for kind in dict.fromkeys(monitor.loggers):
        try:  # a logger that cannot start (no API key, server down) costs its rows, never the run
            if kind == "tensorboard":
                # everything at or after purge_step in earlier event files is hidden: on a fresh start
                # (0) that is a previous attempt's files, on a resume the steps after the checkpoint
                loggers.add(kind, TensorBoardLogger(root / "tensorboard",
                                                    purge_step=0 if resumed_step is None else resumed_step + 1))
            elif kind == "wandb":
                ids.setdefault("wandb", uuid.uuid4().hex[:16])
                loggers.add(kind, wandb_logger(ids["wandb"], project, name, config))
            elif kind == "mlflow":
                logger, ids["mlflow"] = mlflow_logger(ids.get("mlflow"), project, name, config)
                loggers.add(kind, logger)
        except Exception as e:
            if getattr(monitor, "loggers_required", False):
                loggers.close()
                raise InputError(f"logger '{kind}' could not start: {reason(e)} (monitor.loggers_required is true; "
                                 "fix it, or set it to false to train without it)", field="monitor.loggers") from None
            log.warning("monitor.loggers: %s could not start, training goes on without it: %s", kind, reason(e))
            loggers.failed(kind, reason(e))
    if ids:
        ids_path.write_text(json.dumps(ids, indent=1), encoding="utf-8")
    return loggers
