"""Where a process stands among the processes that train one model, and their few collectives.

torchrun (or `tunelab train --nproc N`, which relaunches under it) sets RANK, WORLD_SIZE and
LOCAL_RANK; `init_from_env` joins the process group from them: gloo on CPU, nccl on CUDA (one GPU
per process). Alone (no WORLD_SIZE, or 1) nothing is initialised and every collective below is the
identity, so single-process code paths stay exactly as they were.
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from tunelab.errors import InputError

# Rank 0 evaluates and writes checkpoints while the others wait in a collective; nccl's default
# timeout (10 min) would kill a run whose evaluation is merely long, so both backends wait this long.
WAIT_MINUTES = 60


@dataclass(frozen=True)
class Group:
    """This process's rank among `world_size` processes (rank 0 is the one that writes)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None when alone

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """Where collective tensors live: nccl only moves CUDA tensors."""
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank (picklable objects)."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def gather(self, obj) -> list | None:
        """Every rank's `obj`, in rank order, on rank 0; None on the others."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def sum(self, *values: float) -> tuple[float, ...]:
        """Each value summed over the ranks (float64, so token counts stay exact)."""
        if self.world_size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return tuple(t.tolist())

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on one (a stop request seen by one process stops all)."""
        if self.world_size == 1:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def close(self) -> None:
        """Leave the process group while the interpreter is still whole (idempotent).

        Measured with gloo: a worker that left the group to interpreter shutdown, or destroyed it while
        DDP wrappers (which hold it, inside reference cycles) were still alive, aborted after its
        work was done ("terminate called without an active exception", SIGABRT) in 2 of 10 runs;
        collecting those wrappers first, then destroying the group: 0 of 10.
        """
        if self.world_size > 1 and dist.is_initialized():
            gc.collect()
            dist.destroy_process_group()


ALONE = Group()


def prepare_data_before_joining(prepare) -> list:
    """Read, check and tokenize the run's data into the encoded-data cache (`prepare()`, e.g. the
    run's tunelab.compose.prepare_data) before this process joins the group: done by each
    machine's first process (LOCAL_RANK 0, so a node whose cache folder is not shared fills its
    own), while the others wait in the group's rendezvous, then only read the cache. A long
    tokenization can then never outlast a collective's timeout (WAIT_MINUTES) on the ranks that
    wait for it; a bad input stops this process with exit 2 before any group exists (torchrun
    stops the rest). Alone, or for a task whose data the cache does not hold yet (classification),
    nothing happens here."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return []
    if dist.is_initialized():
        return []
    return prepare()


def init_from_env() -> Group:
    """Join the process group torchrun described in the environment; a no-op when alone.

    On CUDA each process takes the GPU of its LOCAL_RANK (nccl cannot share one GPU between
    ranks). Ranks other than 0 log errors only: rank 0 speaks for the run.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return ALONE
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if local >= torch.cuda.device_count():
            raise InputError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s) are visible: "
                             "start at most one process per GPU")
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(minutes=WAIT_MINUTES))
    if rank:
        logging.getLogger("tunelab").setLevel(logging.ERROR)
    group = Group(rank=rank, world_size=world, local_rank=local, backend=backend)
    if backend == "gloo":  # also on error exits (nccl's teardown may wait on peers that died: not there)
        atexit.register(group.close)
    return group
