"""distributed.strategy fsdp: torch's FSDP2 (`torch.distributed.fsdp.fully_shard`) shards the
parameters, gradients and AdamW state of every transformer block (and of the rest of the model)
across the processes; each block is gathered for its forward and backward only.

Wrapping: each block of the model (models.anatomy.find_blocks: the longest list of identical
modules, so no hand-kept class list) is one FSDP unit; the root unit is the model and the task's
loss together (`ShardRoot`), so that a loss calling into parts of the model (the causal LM's
lm_head at supervised positions) still runs inside the root's forward and its gradients are
reduced; evaluation also runs inside the root's forward (`ShardRoot`), which is where FSDP
gathers the root's own parameters. Gradients are reduce-scattered after every micro-batch, so they stay sharded during
accumulation too (the memory point of sharding; the sum is the same).

Precision: bf16 becomes FSDP's MixedPrecisionPolicy (blocks gathered and computed in bf16,
gradients reduced in fp32); the sharded parameters stay fp32, they are the master weights.
`distributed.cpu_offload` keeps the sharded parameters, gradients and optimizer state in host
memory (CPUOffloadPolicy; on a CPU-only machine that changes nothing).

Checkpoints: torch.distributed.checkpoint (DCP) writes every process's shard of the trainable
weights and of the optimizer state into the checkpoint's `shards/` folder; `consolidate` reads
them back whole in one process (final/), whatever the number of processes that wrote them.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch

from tunelab.distributed.group import Group
from tunelab.distributed.sharded import HeldBytes, broadcast_result, optimizer_state_bytes, share_evenly, tensor_bytes

MEASURED_STEPS = 2  # the bytes held are read during the first steps (they do not change after)


class ShardRoot(torch.nn.Module):
    """The root FSDP unit: the model and the task's loss, and any function of the model (evaluation)
    run as this module's forward, so FSDP's root hooks gather what the blocks do not hold."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch: dict | None = None, call: tuple | None = None):
        if call is not None:
            fn, args = call
            return fn(*args)
        return self.loss_fn(self.model, batch)


def shard_model(model: torch.nn.Module, loss_fn: Callable, *, precision: str, cpu_offload: bool,
                reshard_after_forward: bool, device: torch.device) -> torch.nn.Module:
    """Shard `model` in place (every block, then the rest) and return the root: model + loss.

    Call before the optimizer is built: fully_shard replaces the parameters with sharded ones
    (same names, so parameter groups and layer-wise lr see the same model).
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    from tunelab.models.anatomy import find_blocks

    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16"
          else MixedPrecisionPolicy())
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if cpu_offload else OffloadPolicy()
    kwargs = {"mp_policy": mp, "offload_policy": offload, "reshard_after_forward": reshard_after_forward}
    _, blocks = find_blocks(model, field="distributed.strategy", fix="use distributed.strategy ddp or zero1/2/3")
    for block in blocks:
        fully_shard(block, **kwargs)
    root = ShardRoot(model, loss_fn)
    fully_shard(root, **kwargs)
    return root


class FullyShardedReplicas:
    """The loop's replicas (train.protocols.Replicas) for one of several FSDP2 processes."""

    strategy = "fsdp"

    def __init__(self, root: torch.nn.Module, group: Group):
        self.root, self.group = root, group
        self.world_size = group.world_size
        self.held = HeldBytes()
        self._steps = 0

    def share(self, window: list[list[int]]) -> list[tuple[list[int], bool]]:
        return share_evenly(window, self.group.rank, self.world_size)

    @contextmanager
    def accumulating(self, more_to_come: bool):
        yield  # gradients are reduce-scattered after every micro-batch: they stay sharded
        self._measure()

    def loss(self, batch: dict):
        return self.root(batch)

    def sum(self, *values):
        return self.group.sum(*values)

    def any(self, flag: bool) -> bool:
        return self.group.any(flag)

    def on_main(self, fn: Callable, *args):
        """Evaluation: every process runs fn inside the root's forward (the root's parameters gathered,
        the blocks gather their own), rank 0's result is broadcast (sharded.py says why)."""
        return broadcast_result(self.group, lambda: self.root(call=(fn, args)))

    def clip_and_step(self, optimizer, params, max_norm: float | None, loss_finite: bool) -> tuple[float, bool]:
        """Clip the sharded gradients by their global norm (torch computes it across processes), step."""
        from tunelab.train.protocols import clip_and_step

        self._measure(optimizer)
        norm, stepped = clip_and_step(optimizer, params, max_norm, loss_finite)
        self._measure(optimizer)
        self._steps += 1
        return norm, stepped

    def _measure(self, optimizer=None) -> None:
        if self._steps >= MEASURED_STEPS:
            return
        params = list(self.root.parameters())
        self.held.update(tensor_bytes(params), tensor_bytes(p.grad for p in params),
                         optimizer_state_bytes(optimizer) if optimizer is not None else None)

    def save_shards(self, folder: Path, optimizer) -> None:
        """Every process writes its shard of the trainable weights and optimizer state (collective)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        model_sd, optim_sd = get_state_dict(self.root, optimizer, options=StateDictOptions(ignore_frozen_params=True))
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(folder))

    def load_shards(self, folder: Path, optimizer) -> None:
        """Read a DCP checkpoint into this process's shards (collective); DCP reshards as needed."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

        options = StateDictOptions(ignore_frozen_params=True, strict=False)
        model_sd, optim_sd = get_state_dict(self.root, optimizer, options=options)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(folder))
        set_state_dict(self.root, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=options)


def consolidate(folder: Path) -> dict[str, torch.Tensor]:
    """The whole trainable weights of a DCP checkpoint, read in this one process (no process group)."""
    import torch.distributed.checkpoint as dcp

    meta = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    prefix = "model.model."  # {"model": root's state dict}; the root's own prefix is "model."
    model_sd = {k[len("model."):]: torch.empty(m.size, dtype=m.properties.dtype)
                for k, m in meta.items() if k.startswith(prefix) and hasattr(m, "size")}
    state = {"model": model_sd}
    with warnings.catch_warnings():  # "torch.distributed is disabled ... load in a single process": meant
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(folder), no_dist=True)
    return {k[len("model."):]: v for k, v in state["model"].items()}
