"""The small protocol between a task and the loop: plain data and plain functions."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch


@dataclass
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

    def examples_per_epoch(self) -> int:
        return self.epoch_size if self.epoch_size is not None else len(self.lengths)


@dataclass
class TaskRun:
    model: torch.nn.Module
    tokenizer: Any
    train: TrainSet
    loss_fn: Callable[[torch.nn.Module, dict], tuple[torch.Tensor, int]]
    evaluate: Callable[[torch.nn.Module], dict] | None
    save_final: Callable[[torch.nn.Module, Path], None]
    metric: str
    mode: str
    info: dict = field(default_factory=dict)
    eval_batches: Callable[[], Any] | None = None  # padded eval batches, for feature caching
    # (path, batch_size) -> training-style batches from another file of the same format (EWC's Fisher)
    reference_batches: Callable[[str, int], list[dict]] | None = None
