"""The training loop: the one place to read how tunelab trains.

forward -> loss -> backward (per micro-batch) -> clip -> step -> schedule -> log -> evaluate
-> checkpoint -> early stop. Everything task-specific comes in through `TaskRun` (data, loss,
metrics); everything about files comes in through `io` (log rows, save checkpoints, stop flag);
everything about peer processes (data parallelism) through `replicas`. The three contracts live
in train/protocols.py; tasks/, run_dir and distributed/ implement them.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch

from tunelab.data.batching import epoch_batches
from tunelab.train.early_stop import BestTracker
from tunelab.train.protocols import LoopIO, OneProcess, Replicas, TaskRun


@dataclass
class LoopSettings:
    batch_size: int
    grad_accum: int
    total_steps: int
    max_grad_norm: float | None
    seed: int
    log_every: int
    eval_every: int | None  # None: evaluate at each epoch end
    save_every: int | None  # None: save at each evaluation
    early_stopping: bool
    base_lr: float = 0.0  # the configured optim.lr; the logged lr is its scheduled value
    max_bad_steps: int = 5  # consecutive non-finite steps before the run is stopped
    penalty: Callable | None = None  # regularizer added once per optimizer step (L2-SP, EWC)
    unfreeze: Callable | None = None  # gradual unfreezing: called with (epoch, step); has .stages
    scaler: object | None = None  # torch.amp.GradScaler for fp16


@dataclass
class LoopState:
    """Where the loop is; saved in every checkpoint so a resume continues exactly here."""

    step: int = 0
    epoch: int = 0
    window: int = 0  # accumulation windows already consumed in this epoch
    tokens: int = 0
    samples: int = 0
    train_seconds: float = 0.0  # wall time inside the loop, evaluation and checkpoints included
    eval_seconds: float = 0.0  # the part of train_seconds spent evaluating and saving checkpoints
    skipped_steps: int = 0
    # loss and grad-norm sums since the last logged row (saved too, so a resumed log is identical)
    pending_loss: float = 0.0
    pending_units: int = 0
    pending_norm_max: float = 0.0
    status: str = "running"  # completed | early_stopped | interrupted | diverged
    pending_stats: dict = field(default_factory=dict)  # task.train_stats sums since the last logged row
    world_size: int = 1  # processes training together: a window is world_size x grad_accum micro-batches
    # the window's micro-batches (grad_accum per process, batch_size each), so a resume with another world
    # size can keep them (distributed.reshard); 0: not recorded (a checkpoint of an older tunelab)
    grad_accum: int = 0
    batch_size: int = 0
    # several training sources: the units and rows each one has given so far (TrainSet.unit_source order)
    source_units: list = field(default_factory=list)
    source_rows: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def windows_per_epoch(n_examples: int, batch_size: int, grad_accum: int) -> int:
    return math.ceil(math.ceil(n_examples / batch_size) / grad_accum)


def backward_window(window: list[list[int]], units: int, task: TaskRun, replicas: Replicas, autocast,
                    scale) -> tuple[float, int, dict]:
    """Forward + backward over this process's micro-batches of one optimizer step.

    The summed loss is divided by the units (examples or supervised tokens) of the whole window,
    every process's share included, so accumulation and data parallelism both give the gradient of
    one large batch; DDP averages over processes, hence units / world_size. Returns the window's
    loss sum, token count and the task's train_stats sums, over all processes.
    """
    mine = replicas.share(window)
    window_loss, tokens = 0.0, 0
    stats = dict.fromkeys(task.train_stats.names, 0.0) if task.train_stats is not None else {}
    for i, (idx, counted) in enumerate(mine):
        batch = task.train.collate(idx)
        with replicas.accumulating(i < len(mine) - 1):  # the gradient all-reduce waits for the last
            with autocast():
                loss_sum, _ = replicas.loss(batch)
            # a process with no micro-batch left at an epoch's end still joins the all-reduce, at weight 0
            scale(loss_sum / (units / replicas.world_size) if counted else loss_sum * 0.0).backward()
        if counted:
            window_loss += loss_sum.item()
            # packed batches carry a 4-D mask, so they say their token count themselves
            tokens += int(batch["num_tokens"]) if "num_tokens" in batch else int(batch["attention_mask"].sum())
        if stats:  # a zero-weight copy's measures do not count, as its loss does not
            measured = task.train_stats.take()
            for k in stats:
                stats[k] += measured[k] if counted else 0.0
    window_loss, tokens, *sums = replicas.sum(window_loss, tokens, *stats.values())
    return window_loss, int(tokens), dict(zip(stats, sums))


def count_sources(state: LoopState, window: list[list[int]], train) -> None:
    """Add a window's units and rows to the counts of the sources they came from (the whole window:
    every process knows it, so the counts are the run's, on every process)."""
    idx = np.fromiter((i for micro in window for i in micro), dtype=np.int64)
    src = np.asarray(train.unit_source)[idx]
    n = max(len(state.source_units), int(np.max(train.unit_source)) + 1)
    rows = np.asarray(train.unit_rows)[idx] if train.unit_rows is not None else np.ones_like(src)
    units = np.bincount(src, minlength=n)
    rows = np.bincount(src, weights=rows, minlength=n)
    state.source_units = [int(a + b) for a, b in zip(state.source_units or [0] * n, units)]
    state.source_rows = [int(a + b) for a, b in zip(state.source_rows or [0] * n, rows)]


def evaluation_due(step: int, eval_every: int | None, end_of_epoch: bool, total_steps: int) -> bool:
    """When the loop evaluates: every `eval_every` steps, at each epoch's end, and at the last step."""
    return bool((eval_every and step % eval_every == 0) or end_of_epoch or step == total_steps)


def eval_row(metrics: dict, state: LoopState, epoch: float) -> dict:
    row = {"step": state.step, "epoch": round(epoch, 4)}
    row.update({f"eval_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
    return row


def optimizer_step(optimizer, scheduler, params, s: LoopSettings, state: LoopState,
                   window_loss: float, replicas: Replicas) -> tuple[float, float, bool]:
    """Clip, step, zero the grads and advance the schedule for one accumulation window.

    Returns (pre-clip grad norm, the lr this step used, whether the step was finite). A step whose
    loss or gradient norm is not finite is skipped and counted; under fp16 an overflow is the
    GradScaler's business (it skips the step and lowers the scale), not divergence.
    """
    g0 = optimizer.param_groups[0]
    lr = g0["lr"] * s.base_lr / g0["initial_lr"] if s.base_lr else g0["lr"]
    if s.scaler is not None:
        s.scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm or float("inf")).item()
        old_scale = s.scaler.get_scale()
        s.scaler.step(optimizer)
        s.scaler.update()
        if s.scaler.get_scale() < old_scale:
            state.skipped_steps += 1
        finite = math.isfinite(window_loss)
    else:  # the replicas clip and step: a sharded engine (DeepSpeed) owns its partitioned gradients
        grad_norm, finite = replicas.clip_and_step(optimizer, params, s.max_grad_norm, math.isfinite(window_loss))
        state.skipped_steps += not finite
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return grad_norm, lr, finite


def window_examples(window: list[list[int]], train, limit: int = 20) -> list[str]:
    """The examples of an accumulation window, as "file:line" where the task knows it, else "#index"."""
    idx = [i for micro in window for i in micro][:limit]
    src = train.sources
    return [src[i] if src is not None and i < len(src) else f"#{i}" for i in idx]


def train_row(state: LoopState, s: LoopSettings, epoch: float, lr: float, grad_norm: float, penalty: float) -> dict:
    """One metrics.jsonl training row: means since the last row, counters, and the last step's lr and norm."""
    row = {"step": state.step, "epoch": round(epoch, 4),
           "loss": state.pending_loss / max(1, state.pending_units),
           "lr": lr, "grad_norm": grad_norm, "grad_norm_max": state.pending_norm_max,
           "tokens": state.tokens, "samples": state.samples,
           "elapsed": round(state.train_seconds, 3), "skipped_steps": state.skipped_steps}
    if s.penalty is not None:
        row["penalty"] = penalty
    if s.unfreeze is not None:
        row["unfreeze_stage"] = s.unfreeze.stages
    return row


def epoch_windows(task, batch_size: int, seed: int, epoch: int, per_step: int) -> list[list]:
    """One epoch's accumulation windows of `per_step` micro-batches, in the loop's order (the task's
    epoch subset applied: replay and weighted mixing); the lr range test (train/lr_find.py) walks the same."""
    subset = task.train.epoch_subset(epoch) if task.train.epoch_subset else None
    batches = epoch_batches(task.train.lengths, batch_size, seed=seed, epoch=epoch, subset=subset)
    return [batches[i : i + per_step] for i in range(0, len(batches), per_step)]


def train_loop(model, optimizer, scheduler, task: TaskRun, s: LoopSettings, state: LoopState,
               tracker: BestTracker, io: LoopIO, autocast, replicas: Replicas | None = None) -> LoopState:
    replicas = replicas or OneProcess(model, task.loss_fn)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    scale = s.scaler.scale if s.scaler is not None else (lambda x: x)
    model.train()
    started = time.monotonic() - state.train_seconds
    bad_in_a_row = 0
    while state.step < s.total_steps and state.status == "running":
        # micro-batches per optimizer step, all processes
        windows = epoch_windows(task, s.batch_size, s.seed, state.epoch, s.grad_accum * replicas.world_size)
        while state.window < len(windows) and state.step < s.total_steps:
            window = windows[state.window]
            if s.unfreeze is not None:
                s.unfreeze(state.epoch, state.step)
            units = sum(task.train.count(idx) for idx in window)  # every process knows the whole window
            window_loss, tokens, stats = backward_window(window, units, task, replicas, autocast, scale)
            for k, v in stats.items():
                state.pending_stats[k] = state.pending_stats.get(k, 0.0) + v
            state.tokens += tokens
            state.samples += sum(len(idx) for idx in window)
            if task.train.unit_source is not None:
                count_sources(state, window, task.train)
            penalty = 0.0
            if s.penalty is not None:
                reg = s.penalty(model)
                scale(reg).backward()
                penalty = reg.item()
            grad_norm, lr, finite = optimizer_step(optimizer, scheduler, params, s, state, window_loss, replicas)
            bad_in_a_row = 0 if finite else bad_in_a_row + 1
            if not finite:  # name the rows behind it: a NaN/Inf loss is often one broken example, not the lr
                io.log({"step": state.step + 1, "event": "nonfinite_step", "examples": window_examples(window, task.train)})
            state.step += 1
            state.window += 1
            epoch = state.epoch + state.window / len(windows)
            state.pending_loss += window_loss
            state.pending_units += units
            state.pending_norm_max = max(state.pending_norm_max, grad_norm)
            if bad_in_a_row >= s.max_bad_steps:
                state.status = "diverged"
                io.log({"step": state.step, "event": "diverged", "skipped_steps": state.skipped_steps})
                break
            # log
            state.train_seconds = time.monotonic() - started
            if hasattr(io, "step_done"):  # every step, logged or not: the live display's ETA (RunDir)
                io.step_done(state.step, state.train_seconds)
            if state.step % s.log_every == 0 or state.step == s.total_steps:
                row = train_row(state, s, epoch, lr, grad_norm, penalty)
                if task.train_stats is not None:
                    row.update(task.train_stats.row(state.pending_stats))
                io.log(row)
                state.pending_loss, state.pending_units, state.pending_norm_max = 0.0, 0, 0.0
                state.pending_stats = {}
            # evaluate, track the best, early-stop
            due_eval = evaluation_due(state.step, s.eval_every, state.window == len(windows), s.total_steps)
            is_best, metrics = False, None
            paused = time.monotonic()  # evaluation and checkpoint time is kept out of the training rate
            if due_eval and task.evaluate is not None:
                metrics = replicas.on_main(task.evaluate, model)  # rank 0 evaluates; all get its numbers
                row = eval_row(metrics, state, epoch)
                io.log(row)
                is_best = tracker.update(row[tracker.metric], state.step)
                if s.early_stopping and tracker.should_stop:
                    state.status = "early_stopped"
            # checkpoint
            stop = replicas.any(io.stop_requested())  # a signal seen by one process stops them all
            if stop and state.status == "running":
                state.status = "interrupted"
            # never checkpoint inside a streak of non-finite steps: the last checkpoint precedes the fault
            due_save = due_eval or (s.save_every and state.step % s.save_every == 0) or state.status != "running"
            if due_save and bad_in_a_row == 0:
                state.eval_seconds += time.monotonic() - paused
                paused = time.monotonic()
                state.train_seconds = paused - started
                io.save(state, tracker, is_best, metrics)
            state.eval_seconds += time.monotonic() - paused
            if state.status != "running":
                break
        if state.window >= len(windows):  # the epoch is complete (not just the step budget)
            state.epoch += 1
            state.window = 0
    if state.status == "running":
        state.status = "completed"
    state.train_seconds = time.monotonic() - started
    return state
