"""The run dir: where it goes, whether it may be (re)used, and the loop's view of it.

Layout (the contract in DESIGN.md): config.yaml, metrics.jsonl, param_groups.json, checkpoints/,
final/, summary.json, report.html.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import threading
from datetime import datetime
from pathlib import Path

import torch

from tunelab.errors import InputError, RunFailure
from tunelab.monitor.loggers import LoggerSet
from tunelab.monitor.metrics_log import MetricsLog, read_metrics
from tunelab.monitor.progress import Progress
from tunelab.train import checkpoint as ckpt
from tunelab.train.early_stop import BestTracker
from tunelab.train.loop import LoopState

log = logging.getLogger("tunelab")


def default_output_dir(config_path: str | Path | None) -> Path:
    stem = Path(config_path).stem if config_path else "run"
    return Path("runs") / f"{stem}-{datetime.now():%Y%m%d-%H%M%S}"


def prepare_run_dir(out: Path, resume: str | None) -> Path | None:
    """Check the output dir against the resume request; return the checkpoint to resume from."""
    if out.exists() and not out.is_dir():
        raise InputError("the output dir is a file; choose another --output-dir", file=out)
    if resume is None:
        if (out / "metrics.jsonl").exists() or (out / "checkpoints").exists():
            raise InputError("output dir already holds a run; pass --resume auto to continue it, or choose another --output-dir", file=out)
        return None
    if resume != "auto":
        path = Path(resume)
        problem = ckpt.verify(path) if path.is_dir() else "not a folder"
        if problem:
            raise InputError(f"cannot resume from this checkpoint: {problem}", file=path)
        return path
    if (out / "summary.json").exists():
        status = json.loads((out / "summary.json").read_text()).get("status")
        if status in ("completed", "early_stopped"):
            raise InputError(f"this run already finished ({status}); nothing to resume", file=out)
    path, skipped = ckpt.find_resumable(out / "checkpoints")
    for note in skipped:
        log.warning("resume: skipping %s", note)
    return path


def start_over(out: Path) -> None:
    """Remove what a run wrote before its first intact checkpoint, so a fresh start does not append to it
    (the TensorBoard events go too: their steps would repeat). Unusable checkpoints are set aside in
    checkpoints.unusable/, not deleted: retention must not weigh a stale high step against the new ones."""
    for name in ("metrics.jsonl", "config.yaml", "param_groups.json", "summary.json", "loggers.json"):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "tensorboard", ignore_errors=True)
    if (out / "checkpoints").is_dir():
        shutil.rmtree(out / "checkpoints.unusable", ignore_errors=True)
        os.replace(out / "checkpoints", out / "checkpoints.unusable")


def trim_metrics(path: Path, step: int) -> None:
    """Drop rows that a killed run logged after the checkpoint we resume from."""
    rows = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def memory_now_mb(device: torch.device) -> float:
    """Memory held now, for the metrics rows' `memory_mb`: what the CUDA caching allocator reserves on a
    GPU, the process's resident set on the CPU (the report plots it over time)."""
    if device.type == "cuda":
        return torch.cuda.memory_reserved(device) / 2**20
    from tunelab.plan.planner import runtime_bytes

    return runtime_bytes() / 2**20


class RunDir:
    """The loop's view of the run dir: where rows are logged and checkpoints saved."""

    def __init__(self, root: Path, model, optimizer, scheduler, keep_last: int, progress: Progress,
                 should_stop=None):
        self.root = root
        self.ckpt_root = root / "checkpoints"
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.device = next(model.parameters()).device
        self.keep_last = keep_last
        self.progress = progress
        self.metrics = MetricsLog(root / "metrics.jsonl")
        self.best_checkpoint: str | None = None
        self.loggers = LoggerSet()  # monitor.loggers (TensorBoard, W&B, MLflow): each gets every row written here
        self.health = None  # a monitor.health.HealthMonitor: its diagnoses become rows too
        self.eval_key: str | None = None  # what the evaluations measure (run.eval_key); stored beside them
        self._stop = threading.Event()
        self._should_stop = should_stop

    def request_stop(self, *_):
        self._stop.set()

    def stop_requested(self) -> bool:
        return self._stop.is_set() or bool(self._should_stop and self._should_stop())

    def log(self, row: dict) -> None:
        """Write the row, and the health events it raises (each warned once), to metrics.jsonl and the loggers."""
        try:
            events = self.health.observe(row) if self.health is not None else []
        except Exception as e:  # a diagnosis must never cost the run
            log.warning("health checks stopped: %s", e)
            self.health, events = None, []
        if "loss" in row and "memory_mb" not in row:
            row = {**row, "memory_mb": round(memory_now_mb(self.device), 1)}
        for r in (row, *(e.row() for e in events)):
            self.metrics.write(r)
            self.loggers.log(r)  # a failing logger is dropped there, with one warning and its status kept
        self.progress.update(row.get("step", 0), row)
        for e in events:
            log.warning("health at step %d: %s", e.step, e.message)

    def close_loggers(self) -> None:
        self.loggers.close()

    def step_done(self, step: int, loop_seconds: float) -> None:
        """Every optimizer step (logged or not): the live display's step-time estimate."""
        self.progress.step_done(step, loop_seconds)

    def save(self, state: LoopState, tracker: BestTracker, is_best: bool, metrics: dict | None = None,
             rank_rng: list[dict] | None = None) -> None:
        """Checkpoint the run; `metrics` is the full evaluation of these weights when one just ran.

        The evaluation travels inside the checkpoint so the final summary can report it for the
        weights it ships without evaluating them a second time. `rank_rng`: every process's RNG
        state when several train together (tunelab.distributed.SharedRunIO gathers them).
        """
        best = ckpt.checkpoint_name(state.step) if is_best else self.best_checkpoint
        payload = {"loop": state.to_dict(), "tracker": tracker.state_dict(), "best_checkpoint": best,
                   "eval": metrics, "eval_key": self.eval_key}
        try:
            ckpt.save_checkpoint(self.ckpt_root, step=state.step, model=self.model, optimizer=self.optimizer,
                                 scheduler=self.scheduler, state=payload, rank_rng=rank_rng)
        except OSError as e:
            intact, _ = ckpt.find_resumable(self.ckpt_root)
            kept = f"the previous checkpoint {intact.name} is intact" if intact else "no earlier checkpoint exists"
            raise RunFailure(f"could not write checkpoint {ckpt.checkpoint_name(state.step)} ({e.strerror or e}); "
                             f"{kept}; free space and rerun with --resume auto") from None
        self.best_checkpoint = best
        keep = {self.best_checkpoint} if self.best_checkpoint else set()
        ckpt.apply_retention(self.ckpt_root, keep_last=self.keep_last, keep=keep)
        # an event row for the loggers only (they send no scalars for it): the Python API's save callbacks
        self.loggers.log({"event": "save", "step": state.step, "checkpoint": ckpt.checkpoint_name(state.step), "is_best": is_best})
