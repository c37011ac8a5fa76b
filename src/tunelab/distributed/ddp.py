"""Data parallelism with torch DDP: what the loop needs to know about its peer processes.

The loop asks a `replicas` object four things: which micro-batches of an optimizer step are this
process's (`share`), whether to hold the gradient all-reduce back (`accumulating`), the loss of a
micro-batch (`loss`), and sums over processes (`sum`, `any`, `on_main`): the `Replicas` contract of
tunelab.train.protocols. `OneProcess` (there) answers them for a process alone (the identity);
`DataParallel` (here) for one of several, with
torch.nn.parallel.DistributedDataParallel doing the gradient all-reduce.

Batch semantics: `train.batch_size` is per process; an optimizer step takes world_size x
grad_accum micro-batches from the epoch's list, which every process computes identically
(`epoch_batches` is a pure function of seed and epoch). Process r takes the micro-batches at
r, r + world_size, ... of that window. The last window of an epoch may hold fewer: a process left
without one runs a zero-weight copy of the window's first micro-batch, so every process still joins
the all-reduce and no example is dropped. The loss is divided by the units (examples or supervised
tokens) of the whole window; DDP averages gradients over processes, so each process divides by
units / world_size, and the step equals one process's step over the union of the micro-batches.
"""

from __future__ import annotations

import inspect
import threading
from contextlib import nullcontext
from typing import Callable

import torch

from tunelab.distributed.group import Group
from tunelab.errors import InputError
from tunelab.train import checkpoint as ckpt
from tunelab.train.protocols import OneProcess, clip_and_step


class LossModule(torch.nn.Module):
    """The model and the task's loss as one module, so the whole loss runs as DDP's forward.

    DDP only all-reduces the gradients of a backward that follows a forward through its wrapper,
    and task losses call into parts of the model (the causal LM applies `lm_head` at supervised
    positions only), so wrapping the model alone would silently skip the synchronisation.
    """

    def __init__(self, model: torch.nn.Module, loss_fn: Callable):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: dict):
        return self.loss_fn(self.model, batch)


def wrap_ddp(module: torch.nn.Module, group: Group) -> torch.nn.parallel.DistributedDataParallel:
    """DDP around `module`, on this process's GPU under nccl (inputs are moved there by DDP).

    Buffers are not re-broadcast at every forward: a fine-tuned transformer's buffers are constants
    (position ids, Mixout's pre-trained weights), identical on every process from the start.
    """
    ddp = torch.nn.parallel.DistributedDataParallel
    # torch 2.13 renamed the switch (and still syncs buffers once at start, which is what we want)
    no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
               else {"broadcast_buffers": False})
    return ddp(module, device_ids=[group.local_rank] if group.backend == "nccl" else None, **no_sync)


class DataParallel:
    """The replicas of one of `group.world_size` processes, each holding the whole model (DDP)."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable, group: Group):
        self.group = group
        self.world_size = group.world_size
        self.ddp = wrap_ddp(LossModule(model, loss_fn), group)

    def share(self, window: list[list[int]]) -> list[tuple[list[int], bool]]:
        """This process's micro-batches of one optimizer step, each with whether it counts."""
        mine = window[self.group.rank :: self.world_size]
        return [(idx, True) for idx in mine] or [(window[0], False)]

    def accumulating(self, more_to_come: bool):
        """DDP's no_sync for all but the last micro-batch: one gradient all-reduce per step."""
        return self.ddp.no_sync() if more_to_come else nullcontext()

    def loss(self, batch: dict):
        return self.ddp(batch)

    def sum(self, *values):
        return self.group.sum(*values)

    def any(self, flag: bool) -> bool:
        return self.group.any(flag)

    def on_main(self, fn: Callable, *args):
        """fn(*args) run by rank 0 alone, its result broadcast (the others wait for it).

        Evaluation runs this way: each task's metrics (F1, confusion matrix, perplexity) stay
        one plain function, and every process gets the same numbers, hence makes the same
        best-checkpoint and early-stopping decisions.
        """
        return self.group.broadcast(fn(*args) if self.group.is_main else None)

    def clip_and_step(self, optimizer, params, max_norm: float | None, loss_finite: bool) -> tuple[float, bool]:
        return clip_and_step(optimizer, params, max_norm, loss_finite)  # DDP's gradients are whole, equal everywhere


def replicas_for(model: torch.nn.Module, loss_fn: Callable, group: Group):
    return DataParallel(model, loss_fn, group) if group.world_size > 1 else OneProcess(model, loss_fn)


class SharedRunIO:
    """The loop's io for one of several processes: rank 0 alone writes the run dir.

    Every process calls log and save at the same points (the loop's decisions come from summed or
    broadcast values, so they agree); save gathers each process's RNG state into rank 0's
    checkpoint, so a resume gives every process back its own dropout stream.
    """

    def __init__(self, run_dir, group: Group):
        self.run_dir = run_dir  # RunDir on rank 0, None on the others
        self.group = group
        self._stop = threading.Event()

    def request_stop(self, *_):
        self._stop.set()

    def stop_requested(self) -> bool:
        return self._stop.is_set() or (self.run_dir is not None and self.run_dir.stop_requested())

    def log(self, row: dict) -> None:
        if self.run_dir is not None:
            self.run_dir.log(row)

    def step_done(self, step: int, loop_seconds: float) -> None:
        if self.run_dir is not None:  # rank 0's live display
            self.run_dir.step_done(step, loop_seconds)

    def save(self, state, tracker, is_best: bool, metrics: dict | None = None) -> None:
        rng = self.group.gather(ckpt.rng_state())
        if self.run_dir is not None:
            self.run_dir.save(state, tracker, is_best, metrics, rank_rng=rng)


def check_supported(world_size: int, *, strategy: str, task: str, method: str, train, regularization, final: str,
                    unfreeze_every: int | None) -> None:
    """Refuse, at load time, the options that do not work with several processes yet.

    The keys it judges: distributed.strategy, task, method, the train section (precision,
    auto_batch), the regularization section, checkpoint.final and unfreeze.every."""
    if world_size <= 1:
        return
    from tunelab.distributed.sharded import check_strategy

    check_strategy(world_size, strategy=strategy, task=task, method=method, precision=train.precision,
                   regularization=regularization, final=final)
    if train.auto_batch:
        raise InputError("train.auto_batch cannot retry an out-of-memory step with several processes yet; "
                         "set train.auto_batch: false or train with one process", field="train.auto_batch")
    if unfreeze_every:
        raise InputError("gradual unfreezing changes which parameters train, which DDP fixes at the start; "
                         "remove unfreeze.every or train with one process", field="unfreeze.every")

