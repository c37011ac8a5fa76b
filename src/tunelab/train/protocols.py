"""The loop's contracts: what `train_loop` needs from a task, from the run dir and from its peers.

The loop owns these shapes and everything else implements them: a task (tunelab.tasks) builds a
`TaskRun` with its `TrainSet`; the run dir (tunelab.run_dir.RunDir, or distributed's SharedRunIO)
is a `LoopIO`; the processes training together are `Replicas` (`OneProcess` here, for a process
alone; tunelab.distributed.ddp.DataParallel for one of several). Arrows point into train/, never
out of it: the loop imports nothing from tasks/ or distributed/.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from tunelab.train.early_stop import BestTracker
    from tunelab.train.loop import LoopState


@dataclass(frozen=True)
class TrainSet:
    """Encoded training data the loop can batch without knowing the task.

    `count(indices)` is the number of loss units (examples, or supervised tokens) in a
    micro-batch: the loop divides the summed loss of an accumulation window by the total count of
    the window, so accumulation gives the same gradient as one large batch.
    """

    lengths: list[int]
    collate: Callable[[list[int]], dict[str, torch.Tensor]]
    count: Callable[[list[int]], int]
    epoch_subset: Callable[[int], list[int]] | None = None  # examples of epoch e (replay mixing)
    epoch_size: int | None = None  # examples per epoch when epoch_subset is set
    sources: list[str] | None = None  # "file:line" per example index, to name the rows behind a NaN/Inf loss
    # several training sources (data.train as a list, replay): each unit's source index, and the rows (examples)
    # each unit holds (None: one; a pack holds several), so the loop counts what every source really gave
    unit_source: Any = None
    unit_rows: Any = None

    def examples_per_epoch(self) -> int:
        return self.epoch_size if self.epoch_size is not None else len(self.lengths)


@dataclass(frozen=True)
class TaskRun:
    """What a task hands the loop: model, data, loss, evaluation, how to save. A value: a step that
    changes one part (the device wrapper, feature caching, LoRA's saver) builds a new one with
    `dataclasses.replace`."""

    model: torch.nn.Module
    tokenizer: Any
    train: TrainSet
    loss_fn: Callable[[torch.nn.Module, dict], tuple[torch.Tensor, int]]
    evaluate: Callable[[torch.nn.Module], dict] | None
    save_final: Callable[[torch.nn.Module, Path], None]
    metric: str
    mode: str
    info: dict = field(default_factory=dict)
    eval_batches: Callable[[], Any] | None = None  # {eval source name: padded batches}, for feature caching
    # (path, batch_size) -> training-style batches from another file of the same format (EWC's Fisher)
    reference_batches: Callable[[str, int], list[dict]] | None = None
    # evaluate.generation.GenerationEval (chat, causal_lm): replies measured before, during and after training
    generation: Any = None
    # the task's own training measures (preference: rewards, margins): `names`, `take()` -> {name: sum} over the
    # loss_fn calls since the last take, `row(sums)` -> the train row's keys; the loop sums them like the loss
    train_stats: Any = None
    # (model, run_dir, group, autocast, on_main): once-per-run work kept in the run dir, run by every process
    # before training and before a resume loads a checkpoint (preference, full fine-tuning: the reference model's
    # log-probs); on_main(fn) runs fn where the weights are whole (a sharded strategy's replicas), None alone/ddp
    prepare: Callable[[torch.nn.Module, Path, Any, Any, Any], None] | None = None


@runtime_checkable
class LoopIO(Protocol):
    """Where the loop's results go: metric rows, checkpoints, and whether to stop."""

    def log(self, row: dict) -> None: ...
    def save(self, state: LoopState, tracker: BestTracker, is_best: bool, metrics: dict | None) -> None: ...
    def stop_requested(self) -> bool: ...


@runtime_checkable
class Replicas(Protocol):
    """The processes training this model together (OneProcess below; distributed.ddp.DataParallel)."""

    world_size: int
    def share(self, window: list[list[int]]) -> list[tuple[list[int], bool]]: ...
    def accumulating(self, more_to_come: bool): ...
    def loss(self, batch: dict): ...
    def sum(self, *values): ...
    def any(self, flag: bool) -> bool: ...
    def on_main(self, fn, *args): ...
    def clip_and_step(self, optimizer, params, max_norm: float | None, loss_finite: bool) -> tuple[float, bool]: ...


def clip_and_step(optimizer, params, max_norm: float | None, loss_finite: bool) -> tuple[float, bool]:
    """Clip the gradients to `max_norm` (global 2-norm), then step unless the loss or the norm is not
    finite; returns (pre-clip norm, whether the step was taken). Sharded gradients (FSDP's DTensors)
    clip by the norm over all processes, which torch computes; the returned norm is that full one."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf"))
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    if loss_finite and math.isfinite(norm):
        optimizer.step()
        return norm, True
    return norm, False


class OneProcess:
    """The replicas of a process training alone: every micro-batch is its own, sums are values."""

    world_size = 1

    def __init__(self, model: torch.nn.Module, loss_fn: Callable):
        self.model, self.loss_fn = model, loss_fn

    def share(self, window: list[list[int]]) -> list[tuple[list[int], bool]]:
        return [(idx, True) for idx in window]

    def accumulating(self, more_to_come: bool):
        return nullcontext()

    def loss(self, batch: dict):
        return self.loss_fn(self.model, batch)

    def sum(self, *values):
        return values

    def any(self, flag: bool) -> bool:
        return flag

    def on_main(self, fn: Callable, *args):
        return fn(*args)

    def clip_and_step(self, optimizer, params, max_norm: float | None, loss_finite: bool) -> tuple[float, bool]:
        return clip_and_step(optimizer, params, max_norm, loss_finite)
