"""`tunelab train --nproc N`: relaunch the same command under torchrun, N processes on this machine.

The launcher is torchrun's own code (`torch.distributed.run.run`, what `python -m
torch.distributed.run --standalone --nproc_per_node N -m tunelab.cli train ...` executes), called
in this process so that the workers' exit code comes back as ours: 0 done, 2 bad input, 130
stopped by a signal (resumable), 1 anything else. torchrun itself would turn every worker failure
into exit 1 and a traceback.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from tunelab.errors import InputError


def process_limit() -> tuple[int, str]:
    """How many processes this machine can run: one per GPU under CUDA, else one per usable core."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.device_count(), "GPU(s)"
    return len(os.sched_getaffinity(0)), "CPU core(s)"


def check_nproc(nproc: int) -> None:
    limit, what = process_limit()
    if nproc > limit:
        raise InputError(f"--nproc {nproc} is more than this machine's {limit} {what} (one process each); "
                         f"use --nproc {limit} or fewer")


@dataclass(frozen=True)
class Nodes:
    """Several machines (`--nnodes`): torchrun's static rendezvous at node 0's address and port; each
    machine runs the same command with its own node rank. Global rank 0 (on node 0) writes the run
    dir, so the output dir (and its checkpoints) must be on a filesystem every node shares."""

    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int

    def torchrun_args(self) -> list[str]:
        return [f"--nnodes={self.nnodes}", f"--node-rank={self.node_rank}", f"--master-addr={self.master_addr}",
                f"--master-port={self.master_port}"]


def launch(nproc: int, cli_args: list[str], debug: bool = False, nodes: Nodes | None = None) -> int:
    """Run `python -m tunelab.cli <cli_args>` as `nproc` processes (per node) under torchrun; their exit code."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # on a signal, torchrun passes it on and SIGKILLs the workers after 30 s; finishing a step and
    # saving a checkpoint of a large model on CPU can take longer (the save is atomic either way)
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "300")
    if "OMP_NUM_THREADS" not in os.environ:  # torchrun would set 1 (and say so); share the cores out instead
        os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // nproc))
    if not debug:  # the workers report their own errors; the agent's log lines would repeat them
        for name in ("", "torch", "torch.distributed"):  # torch's loggers print through their own handlers
            for handler in logging.getLogger(name).handlers:
                handler.addFilter(lambda record: not record.name.startswith("torch.distributed"))
    where = nodes.torchrun_args() if nodes is not None else ["--standalone"]
    args = parse_args([*where, f"--nproc_per_node={nproc}", "-m", "tunelab.cli", *cli_args])
    try:
        run(args)
    except ChildFailedError as e:
        _, first = e.get_first_failure()  # the root cause; the others were stopped because of it
        return first.exitcode if first.exitcode in (1, 2, 130) else 1
    except SignalException:  # torchrun passed the signal on; the workers saved a checkpoint and stopped
        return 130
    return 0
