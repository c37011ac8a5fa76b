"""Resuming a run with another number of processes (`--nproc`), or across one process, ddp and fsdp.

What exact means across world sizes. An epoch's micro-batches (`data.batching.epoch_batches`) are a
pure function of the seed, the epoch and `train.batch_size` (per process), whatever the number of
processes; an optimizer step takes the next world_size x grad_accum of them (its window) and
equals one process's step over their union. So a resume with another world size continues exactly
the same sequence of optimizer steps (the same examples in every step, the loss divided by the same
units, the same lr schedule) when it keeps the micro-batches per step, world_size x grad_accum, and
the batch size: 2 processes x grad_accum 1 continue as 1 process x grad_accum 2, and the other way
round. Compared with the uninterrupted run the weights then agree to the bound of the parity tests
(1e-5 after steps that move them by ~5e-3), not bit for bit: each process sums its own gradients
before the processes' sums are added, so another split adds in another order. Two things cannot be
kept, and are documented rather than hidden: dropout masks (a micro-batch's masks come from the RNG
of the process that computes it; with another world size micro-batches move between processes, so
with dropout > 0 the continuation draws other masks of the same distribution; a process the
checkpoint's run did not have keeps its seeded stream), and bit-identity itself (the summation order).
Any other window is refused at load time with the grad_accum that keeps it.

Formats. A one-process or ddp checkpoint holds the whole trainable weights and optimizer state
(weights.safetensors, optimizer.pt); an fsdp checkpoint holds DCP shards (shards/). Both kinds load
into both kinds of run: DCP reads its shards into any number of fsdp processes (it reshards) and,
with no process group, into one whole model (`load_dcp_whole`); whole files are cut into an fsdp
process's shards by torch.distributed.checkpoint.state_dict (`load_whole_into_fsdp`).
ZeRO checkpoints (DeepSpeed's partitions, one optimizer file per process) continue under ZeRO with
any number of processes above one: with another, rank 0 converts the checkpoint to DeepSpeed's
universal checkpoint (deepspeed.checkpoint.ds_to_universal) and every process loads its partition
from it (`load_zero_resharded`); in one process (no DeepSpeed there) they are refused.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from tunelab.errors import InputError
from tunelab.train import checkpoint as ckpt

log = logging.getLogger("tunelab")


def weights_format(checkpoint: Path) -> str:
    """'plain' (whole files), 'dcp' (fsdp's shards) or 'zero' (DeepSpeed's partitions)."""
    shards = checkpoint / ckpt.SHARDS
    if not shards.is_dir():
        return "plain"
    return "dcp" if (shards / ".metadata").is_file() else "zero"


def _run_config(checkpoint: Path) -> dict | None:
    """The train section the checkpoint's run was configured with (its run dir's config.yaml)."""
    import yaml

    path = checkpoint.parent.parent / "config.yaml"
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (yaml.YAMLError, UnicodeDecodeError, OSError):
        return None  # check_same_run reports a damaged config.yaml
    train = saved.get("train") if isinstance(saved, dict) else None
    return train if isinstance(train, dict) else None


def _strategy_family(fmt_or_strategy: str) -> str:
    return "zero" if fmt_or_strategy.startswith("zero") else "other"


def check_resume_layout(point: ckpt.ResumePoint, world_size: int, *, strategy: str, train) -> str | None:
    """Refuse a resume that cannot continue the run's optimizer steps; the note to log when it reshards.

    `strategy`: distributed.strategy; `train`: the train section (batch_size, grad_accum). Called on
    every process before the run dir is touched (an input error leaves it as it was).
    """
    from tunelab.distributed.sharded import strategy_of

    checkpoint, loop = point.path, point.loop
    fmt, strategy = weights_format(checkpoint), strategy_of(strategy, world_size)
    saved_world = loop.get("world_size", 1)
    if fmt == "zero" and saved_world != world_size and world_size == 1:
        raise InputError(zero_reshape_refusal(saved_world), file=checkpoint)
    if _strategy_family(fmt) != _strategy_family(strategy):
        said = ("distributed.strategy zero1/zero2/zero3 (the same stage) with --nproc of the run" if fmt == "zero"
                else "one process, or distributed.strategy ddp or fsdp")
        raise InputError(f"this checkpoint was written under {'DeepSpeed ZeRO' if fmt == 'zero' else 'fsdp/ddp/one process'} "
                         f"and cannot continue under '{strategy}'; resume with {said}", file=checkpoint)
    if saved_world == world_size:
        return None
    t = train
    train = ({"grad_accum": loop["grad_accum"], "batch_size": loop["batch_size"]} if loop.get("grad_accum")
             else _run_config(checkpoint))  # an older checkpoint: its run's config.yaml (unless auto_batch changed it)
    if train is None or not isinstance(train.get("grad_accum"), int) or not isinstance(train.get("batch_size"), int):
        raise InputError(f"this run was trained with {saved_world} process(es) and its checkpoint does not say how "
                         f"many micro-batches a step took, so it cannot continue with {world_size}; resume with "
                         f"{_nproc_hint(saved_world)}", file=checkpoint)
    per_step = saved_world * train["grad_accum"]
    if train["batch_size"] == t.batch_size and per_step == world_size * t.grad_accum:
        return (f"resharding: the checkpoint was written by {saved_world} process(es) x train.grad_accum "
                f"{train['grad_accum']}, continuing with {world_size} x {t.grad_accum} (the same {per_step} "
                f"micro-batches of {t.batch_size} a step; equal up to summation order, dropout masks differ)")
    keep = (f"with {world_size} process(es) --set train.grad_accum={per_step // world_size}" if per_step % world_size == 0
            else f"use a number of processes that divides {per_step}")
    if train["batch_size"] != t.batch_size:
        keep += f" --set train.batch_size={train['batch_size']}"
    raise InputError(f"this run was trained with {saved_world} process(es) x train.grad_accum {train['grad_accum']} "
                     f"({per_step} micro-batches of {train['batch_size']} a step) and cannot continue with "
                     f"{world_size} x {t.grad_accum} of {t.batch_size}: the examples of each step would change; "
                     f"resume with {_nproc_hint(saved_world)}, or keep {per_step} micro-batches a step: {keep}",
                     file=checkpoint)


def _nproc_hint(world: int) -> str:
    return f"--nproc {world}" if world > 1 else "one process (no --nproc)"


def zero_reshape_refusal(saved: int) -> str:
    """Why a ZeRO checkpoint does not continue in one process, and what to do (one line)."""
    return (f"this ZeRO run was trained with {saved} processes and its checkpoint holds DeepSpeed's optimizer "
            f"partitions, which continue under ZeRO only (with any --nproc above 1: they are resharded through "
            f"DeepSpeed's universal checkpoint), not in one process; resume with --nproc 2 or more "
            f"(train.grad_accum so that processes x grad_accum stays the run's micro-batches a step)")


def load_model_states(point: ckpt.ResumePoint, model: torch.nn.Module, optimizer, sharding) -> None:
    """Restore the trainable weights and optimizer state of the checkpoint into this process's model,
    whatever wrote them (the loop position, schedule and RNG are checkpoint.load_checkpoint's)."""
    checkpoint = point.path
    fmt = weights_format(checkpoint)
    if sharding is not None and sharding.strategy == "fsdp":
        if fmt == "dcp":
            sharding.replicas.load_shards(checkpoint / ckpt.SHARDS, optimizer)  # DCP reshards as needed
        else:
            load_whole_into_fsdp(checkpoint, sharding.replicas.root, optimizer)
    elif sharding is not None:  # zero*
        if point.loop.get("world_size", 1) == sharding.group.world_size:
            sharding.replicas.load_shards(checkpoint / ckpt.SHARDS, optimizer)
        else:
            load_zero_resharded(point, sharding)
    elif fmt == "dcp":
        load_dcp_whole(checkpoint / ckpt.SHARDS, model, optimizer)
    else:
        ckpt.load_weights_and_optimizer(checkpoint, model, optimizer)


class _Root(torch.nn.Module):
    """The model under the name fsdp.ShardRoot gives it, so its state-dict keys are the DCP keys."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=False, **kw)


def load_dcp_whole(folder: Path, model: torch.nn.Module, optimizer) -> None:
    """An fsdp checkpoint's shards read whole into a plain model and optimizer, in this process alone
    (each ddp process reads the whole for itself: no collective)."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    root = _Root(model)
    model_sd, optim_sd = get_state_dict(root, optimizer, options=_options())
    state = {"model": model_sd, "optim": optim_sd}
    with warnings.catch_warnings():  # "torch.distributed is disabled ... load in a single process": meant
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(folder), no_dist=True)
    set_state_dict(root, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=_options())


def load_whole_into_fsdp(checkpoint: Path, root: torch.nn.Module, optimizer) -> None:
    """A one-process or ddp checkpoint (whole weights.safetensors and optimizer.pt) cut into this fsdp
    process's shards. optimizer.pt names parameters by their position in the optimizer's groups, which
    are built by the same function over the same parameter names on either side, so position i is the
    i-th parameter of this optimizer; the state dict is renamed to those parameters' names (what
    torch.distributed.checkpoint.state_dict reads) and every process keeps its shard of each tensor."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import set_state_dict

    names = {id(p): n for n, p in root.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    saved_ids = [i for g in saved["param_groups"] for i in g["params"]]
    if len(saved_ids) != len(order):
        raise InputError(f"the checkpoint's optimizer holds {len(saved_ids)} parameters, this model trains "
                         f"{len(order)}; resume with the run's own config", file=checkpoint)
    fqn = dict(zip(saved_ids, order))
    optim_sd = {"state": {fqn[i]: st for i, st in saved["state"].items()},
                "param_groups": [{**g, "params": [fqn[i] for i in g["params"]]} for g in saved["param_groups"]]}
    model_sd = {f"model.{k}": v for k, v in load_file(str(checkpoint / "weights.safetensors")).items()}
    set_state_dict(root, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                   options=_options(full_state_dict=True))


def load_zero_resharded(point: ckpt.ResumePoint, sharding) -> None:
    """A ZeRO checkpoint of another world size: rank 0 converts it to DeepSpeed's universal checkpoint
    (beside the checkpoints, where every node sees it; the sealed checkpoint is left as it is), every
    process loads its new partition from that, rank 0 removes it."""
    import os
    import shutil

    from tunelab.distributed.zero import to_universal

    group, checkpoint = sharding.group, point.path
    if group.any(sharding.replicas.partition_without_parameters()):
        saved = point.loop.get("world_size", 1)
        raise InputError(f"cannot reshard this ZeRO checkpoint for {group.world_size} processes: some process's "
                         "partition of a small parameter group would hold no parameter, which DeepSpeed's "
                         f"universal-checkpoint loader cannot fill; resume with --nproc {saved}", file=checkpoint)
    folder = group.broadcast(sharding.ckpt_root / f".tmp-universal-{checkpoint.name}.pid{os.getpid()}")
    try:
        if group.is_main:
            shutil.rmtree(folder, ignore_errors=True)
            to_universal(checkpoint / ckpt.SHARDS, folder)
        group.barrier()
        sharding.replicas.load_shards(folder, universal=True)
        group.barrier()
    finally:
        if group.is_main:
            shutil.rmtree(folder, ignore_errors=True)
