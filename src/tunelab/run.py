"""The training recipe: setup, train, save, in that order (torchtune-style, no trainer class).

Everything that can fail on bad input (config, data, model) runs before the run dir is created,
so a bad input never leaves a folder that looks like a run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import resource
import shutil
import signal
import threading
import time
from datetime import datetime
from pathlib import Path

import torch

from tunelab.config import Config, dump_config
from tunelab.errors import InputError
from tunelab.evaluate.probe import compare, probe_measures, read_probe_texts
from tunelab.models.adapt import apply_method
from tunelab.models.load import count_params
from tunelab.monitor.metrics_log import MetricsLog, read_metrics
from tunelab.monitor.progress import Progress
from tunelab.tasks import setup_task
from tunelab.train import checkpoint as ckpt
from tunelab.train.early_stop import BestTracker
from tunelab.train.loop import LoopSettings, LoopState, eval_row, train_loop, windows_per_epoch
from tunelab.train.optim import build_optimizer, describe_groups, param_groups
from tunelab.train.precision import autocast_factory, grad_scaler, resolve_precision
from tunelab.train.regularizers import apply_mixout, make_penalty, remove_mixout
from tunelab.train.unfreeze import GradualUnfreezer
from tunelab.train.schedules import build_scheduler

log = logging.getLogger("tunelab")


def default_output_dir(config_path: str | Path | None) -> Path:
    stem = Path(config_path).stem if config_path else "run"
    return Path("runs") / f"{stem}-{datetime.now():%Y%m%d-%H%M%S}"


class RunDir:
    """The loop's view of the run dir: where rows are logged and checkpoints saved."""

    def __init__(self, root: Path, model, optimizer, scheduler, keep_last: int, progress: Progress,
                 should_stop=None):
        self.root = root
        self.ckpt_root = root / "checkpoints"
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.keep_last = keep_last
        self.progress = progress
        self.metrics = MetricsLog(root / "metrics.jsonl")
        self.best_checkpoint: str | None = None
        self._stop = threading.Event()
        self._should_stop = should_stop

    def request_stop(self, *_):
        self._stop.set()

    def stop_requested(self) -> bool:
        return self._stop.is_set() or bool(self._should_stop and self._should_stop())

    def log(self, row: dict) -> None:
        self.metrics.write(row)
        self.progress.update(row.get("step", 0), row)

    def save(self, state: LoopState, tracker: BestTracker, is_best: bool) -> None:
        if is_best:
            self.best_checkpoint = ckpt.checkpoint_name(state.step)
        payload = {"loop": state.to_dict(), "tracker": tracker.state_dict(), "best_checkpoint": self.best_checkpoint}
        ckpt.save_checkpoint(self.ckpt_root, step=state.step, model=self.model, optimizer=self.optimizer,
                             scheduler=self.scheduler, state=payload)
        keep = {self.best_checkpoint} if self.best_checkpoint else set()
        ckpt.apply_retention(self.ckpt_root, keep_last=self.keep_last, keep=keep)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def enable_gradient_checkpointing(model) -> None:
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise InputError(f"{type(model).__name__} does not support gradient checkpointing",
                         field="train.gradient_checkpointing")
    if hasattr(model, "activation_checkpointing_enable"):  # the 5.x name; gradient_* is deprecated
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False


def fisher_batches(task, cfg) -> list | None:
    """Reference batches for EWC's Fisher: the file the user named, else the training data."""
    if not cfg.regularization.ewc:
        return None
    if cfg.regularization.ewc_data:
        if task.reference_batches is None:
            raise InputError(f"regularization.ewc_data is not supported for task {cfg.task} yet; "
                             "leave it unset to estimate the Fisher on the training data", field="regularization.ewc_data")
        return task.reference_batches(cfg.regularization.ewc_data, cfg.train.batch_size)[: cfg.regularization.ewc_batches]
    from tunelab.data.batching import epoch_batches

    order = epoch_batches(task.train.lengths, cfg.train.batch_size, seed=cfg.train.seed + 1, epoch=0)
    return [task.train.collate(idx) for idx in order[: cfg.regularization.ewc_batches]]


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _prepare_run_dir(out: Path, resume: str | None) -> Path | None:
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


def _trim_metrics(path: Path, step: int) -> None:
    """Drop rows that a killed run logged after the checkpoint we resume from."""
    rows = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)


def run_training(cfg: Config, output_dir: str | Path | None = None, *, config_path=None, resume: str | None = None,
                 show_progress: bool = True, should_stop=None) -> dict:
    """Fine-tune per `cfg`; returns the summary (also written to summary.json)."""
    wall_start = time.monotonic()
    out = Path(output_dir) if output_dir else default_output_dir(config_path)
    resume_from = _prepare_run_dir(out, resume)

    # ---- setup: data, model, optimizer, schedule (all input errors surface here)
    _seed_everything(cfg.train.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    task = setup_task(cfg)
    model = apply_method(task.model, cfg).to(device)
    task.model = model
    if cfg.method == "feature_extraction" and cfg.feature_extraction.cache_features and cfg.task == "classification":
        from tunelab.tasks.feature_cache import cache_features

        eval_batches = task.eval_batches() if task.eval_batches is not None else None
        task = cache_features(task, model, eval_batches, cfg.train.eval_batch_size or 2 * cfg.train.batch_size)
    if cfg.method in ("lora", "qlora"):  # final/ = PEFT adapter + how to rebuild the base (+ merged/ on request)
        from tunelab.models.lora import adapter_saver

        task.save_final = adapter_saver(task.save_final, cfg, task.info.get("labels"))
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    mixout_layers = apply_mixout(model, cfg.regularization.mixout) if cfg.regularization.mixout else 0
    unfreezer = None
    if cfg.unfreeze.every:
        for p in model.parameters():  # every parameter joins the optimizer; the unfreezer sets requires_grad
            p.requires_grad = True
    probe_texts = probe_before = None
    if cfg.probe.data:
        probe_texts = read_probe_texts(cfg.probe.data, cfg.data.text_column, cfg.probe.max_rows)
        probe_before = probe_measures(model, task.tokenizer, probe_texts, cfg.model.max_length)
    trainable, total = count_params(model)
    precision = resolve_precision(cfg.train.precision, device, total)
    autocast = autocast_factory(precision, device)
    if task.evaluate is not None and task.metric not in task.info.get("metric_names", (task.metric,)):
        raise InputError(f"'{task.metric}' is not an eval metric of this task", field="checkpoint.metric")
    per_epoch = windows_per_epoch(task.train.examples_per_epoch(), cfg.train.batch_size, cfg.train.grad_accum)
    total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * per_epoch))
    head_lr = cfg.optim.head_lr or cfg.optim.lr * cfg.optim.head_lr_multiplier
    groups = param_groups(model, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, head_lr=head_lr,
                          layer_lr_decay=cfg.optim.layer_lr_decay)
    optimizer = build_optimizer(groups, betas=cfg.optim.betas, eps=cfg.optim.eps)
    if cfg.unfreeze.every:
        unfreezer = GradualUnfreezer(model, cfg.unfreeze.every, cfg.unfreeze.unit)
        unfreezer(0, 0)
        trainable, _ = count_params(model)
    penalty = make_penalty(model, l2sp=cfg.regularization.l2sp, ewc=cfg.regularization.ewc,
                           fisher_batches=fisher_batches(task, cfg), loss_fn=task.loss_fn)
    scheduler = build_scheduler(optimizer, total_steps=total_steps, name=cfg.schedule.name,
                                warmup_ratio=cfg.schedule.warmup_ratio, warmup_steps=cfg.schedule.warmup_steps,
                                min_lr_ratio=cfg.schedule.min_lr_ratio, decay_ratio=cfg.schedule.decay_ratio)
    tracker = BestTracker(task.metric, task.mode, cfg.checkpoint.min_delta, cfg.early_stopping.patience)
    state = LoopState()

    # ---- the run dir exists from here on
    out.mkdir(parents=True, exist_ok=True)
    if resume_from is not None:
        _trim_metrics(out / "metrics.jsonl", ckpt.load_state(resume_from)["loop"]["step"])
    progress = Progress(total_steps, enabled=show_progress)
    io = RunDir(out, model, optimizer, scheduler, cfg.checkpoint.keep_last, progress, should_stop)
    before = None
    if resume_from is not None:
        saved = ckpt.load_checkpoint(resume_from, model=model, optimizer=optimizer, scheduler=scheduler)
        state = LoopState(**{**saved["loop"], "status": "running"})
        tracker.load_state_dict(saved["tracker"])
        io.best_checkpoint = saved.get("best_checkpoint")
        before = next((r for r in read_metrics(out / "metrics.jsonl") if r.get("before_training")), None)
        progress.message(f"resumed from {resume_from} at step {state.step}/{total_steps}")
    else:
        dump_config(cfg, out / "config.yaml")
        (out / "param_groups.json").write_text(json.dumps(describe_groups(optimizer), indent=1))
        if cfg.train.eval_before and task.evaluate is not None:
            before = {**eval_row(task.evaluate(model), state, 0.0), "before_training": True}
            io.log(before)
    settings = LoopSettings(
        batch_size=cfg.train.batch_size, grad_accum=cfg.train.grad_accum, total_steps=total_steps,
        max_grad_norm=cfg.train.max_grad_norm, seed=cfg.train.seed, log_every=cfg.train.log_every,
        eval_every=cfg.train.eval_every, save_every=cfg.checkpoint.save_every,
        early_stopping=cfg.early_stopping.enabled and task.evaluate is not None, base_lr=cfg.optim.lr,
        penalty=penalty, unfreeze=unfreezer, scaler=grad_scaler(precision, device),
    )

    # ---- train (Ctrl-C / SIGTERM: finish the step, save, exit with how to resume)
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, io.request_stop)
    try:
        state = train_loop(model, optimizer, scheduler, task, settings, state, tracker, io, autocast)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        progress.close()
        io.metrics.close()

    # ---- save: final model (best or last weights), summary, report
    summary = {
        "status": state.status, "task": cfg.task, "steps": state.step, "total_steps": total_steps,
        "epochs_done": round(state.epoch + (state.window / per_epoch if per_epoch else 0), 4),
        "precision": precision, "device": device.type,
        "trainable_params": trainable, "total_params": total,
        "trainable_percent": round(100 * trainable / total, 4) if total else 0.0,
        "tokens": state.tokens, "samples": state.samples, "train_seconds": round(state.train_seconds, 3),
        "tokens_per_second": state.tokens / state.train_seconds if state.train_seconds else 0.0,
        "samples_per_second": state.samples / state.train_seconds if state.train_seconds else 0.0,
        "skipped_steps": state.skipped_steps,
        "best": {"metric": tracker.metric, "value": tracker.best, "step": tracker.best_step,
                 "checkpoint": io.best_checkpoint},
        "before": before, "data": task.info,
    }
    if state.status in ("completed", "early_stopped"):
        if cfg.checkpoint.final == "best" and io.best_checkpoint and (io.ckpt_root / io.best_checkpoint).is_dir():
            ckpt.load_weights(io.ckpt_root / io.best_checkpoint, model)
            summary["final_weights"] = io.best_checkpoint
        else:
            summary["final_weights"] = "last"
        if mixout_layers:
            remove_mixout(model)
        tmp_final = out / ".tmp-final"
        shutil.rmtree(tmp_final, ignore_errors=True)
        task.save_final(model.cpu() if device.type != "cpu" else model, tmp_final)
        shutil.rmtree(out / "final", ignore_errors=True)
        os.replace(tmp_final, out / "final")
        model.to(device)
        if task.evaluate is not None:
            summary["final"] = task.evaluate(model)
        if probe_texts is not None:
            summary["probe"] = compare(probe_before, probe_measures(model, task.tokenizer, probe_texts, cfg.model.max_length),
                                       cfg.probe.warn_loss_increase)
            if summary["probe"]["forgetting_flag"]:
                log.warning("forgetting probe: %s", summary["probe"]["message"])
    best_row = next((r for r in read_metrics(out / "metrics.jsonl")
                     if r.get("step") == tracker.best_step and tracker.metric in r and not r.get("before_training")), None)
    summary["best"]["metrics"] = best_row
    summary["peak_memory_mb"] = round(_peak_memory_mb(device), 1)
    summary["wall_seconds"] = round(time.monotonic() - wall_start, 3)
    summary["run_dir"] = str(out)
    (out / "summary.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    try:
        from tunelab.analysis.report import write_report

        write_report(out)
    except Exception as e:  # a report must never cost the run
        log.warning("report.html not written: %s", e)
    return summary
