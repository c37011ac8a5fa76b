"""distributed.strategy zero1 | zero2 | zero3: DeepSpeed's ZeRO (`deepspeed.initialize`) partitions
the optimizer state (zero1), also the gradients (zero2), also the parameters (zero3) across the
processes (Rajbhandari et al. 2020).

The engine wraps the model and the task's loss together (ddp.LossModule, as for DDP) and tunelab's
own AdamW (its parameter groups, layer-wise lr, no decay on norms and biases); ZeRO keeps an fp32
master partition of the weights and AdamW's moments per process and steps them. The loop stays
in charge: its loss scaling (DeepSpeed's gradient_accumulation_steps is 1 and each micro-batch
marks whether it ends the step), its lr schedule (stepping the wrapped AdamW's groups), its
clipping threshold (passed to DeepSpeed as gradient_clipping, applied to the global norm of the
partitioned gradients) and its skipping of non-finite steps (DeepSpeed detects them and skips).

Precision: bf16 is DeepSpeed's bf16 mode (module weights in bf16, fp32 master in the optimizer
partition); fp32 trains fp32 throughout. `distributed.cpu_offload` puts the optimizer partition
(and zero3's parameter partition) in host memory, stepped by torch's AdamW there.

Checkpoints are DeepSpeed's own (`engine.save_checkpoint`: model states and one optimizer
partition file per process) in the checkpoint's `shards/` folder; `consolidate` rebuilds the whole
fp32 weights from them in one process (deepspeed.utils.zero_to_fp32).
"""

from __future__ import annotations

import io
import logging
import warnings
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import Callable

import torch

from tunelab.distributed.group import Group
from tunelab.distributed.sharded import HeldBytes, broadcast_result, optimizer_state_bytes, share_evenly, tensor_bytes

TAG = "zero"  # DeepSpeed's checkpoint tag: the subfolder of shards/ it writes
MEASURED_STEPS = 2


def deepspeed_config(stage: int, *, batch_size: int, max_grad_norm: float | None, precision: str,
                     cpu_offload: bool) -> dict:
    """The DeepSpeed config for one ZeRO stage; batch and accumulation stay the loop's business."""
    zero: dict = {"stage": stage}
    if cpu_offload:
        zero["offload_optimizer"] = {"device": "cpu"}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    if stage == 3:
        # DeepSpeed keeps parameters under 1e5 elements whole on every process (fewer, larger gathers);
        # tunelab partitions them too, so zero3 holds 1/N of every parameter as its name promises
        zero["stage3_param_persistence_threshold"] = 0
    return {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": max_grad_norm or 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "zero_allow_untested_optimizer": True,  # tunelab's torch AdamW, with its parameter groups
        "zero_force_ds_cpu_optimizer": False,  # DeepSpeedCPUAdam would need a C++ build; torch's AdamW steps on CPU
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


def start_engine(model: torch.nn.Module, loss_fn: Callable, optimizer, group: Group, config: dict):
    """deepspeed.initialize on the already joined process group; returns the engine."""
    import deepspeed
    import deepspeed.ops

    from tunelab.distributed.ddp import LossModule

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # DeepSpeed 0.19 still calls the collectives torch 2.13 renamed; the warning would repeat at every step
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)`",
                            category=FutureWarning)
    if group.backend == "gloo":
        # DeepSpeed's CPU backend would JIT-compile a shared-memory all-reduce (C++, measured 8m49s on
        # 2 cores) used by its inference kernels only; training collectives go through torch.distributed
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    engine, _, _, _ = deepspeed.initialize(model=LossModule(model, loss_fn), optimizer=optimizer, config=config,
                                           dist_init_required=False)
    return engine


class ZeroReplicas:
    """The loop's replicas (train.protocols.Replicas) for one of several DeepSpeed ZeRO processes."""

    def __init__(self, engine, group: Group, stage: int):
        self.engine, self.group, self.stage = engine, group, stage
        self.strategy = f"zero{stage}"
        self.world_size = group.world_size
        self.held = HeldBytes()
        self._steps = 0

    def share(self, window: list[list[int]]) -> list[tuple[list[int], bool]]:
        return share_evenly(window, self.group.rank, self.world_size)

    @contextmanager
    def accumulating(self, more_to_come: bool):
        """The last micro-batch of a step is DeepSpeed's accumulation boundary (it reduces there)."""
        self.engine.set_gradient_accumulation_boundary(not more_to_come)
        yield
        self._measure()

    def loss(self, batch: dict):
        return self.engine(batch)

    def sum(self, *values):
        return self.group.sum(*values)

    def any(self, flag: bool) -> bool:
        return self.group.any(flag)

    def on_main(self, fn: Callable, *args):
        """Evaluation: rank 0 alone under zero1/2 (each process holds all weights), every process
        under zero3 (the weights are in pieces); rank 0's result is broadcast."""
        if self.stage == 3:
            return broadcast_result(self.group, fn, *args)
        return self.group.broadcast(fn(*args) if self.group.is_main else None)

    def clip_and_step(self, optimizer, params, max_norm: float | None, loss_finite: bool) -> tuple[float, bool]:
        """DeepSpeed's step: global norm of the partitioned gradients, clip, AdamW on the partition,
        gather the weights; a non-finite gradient skips the step (DeepSpeed's overflow check)."""
        self._measure()
        self.engine.step()
        self._measure()
        self._steps += 1
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        return norm, bool(self.engine.was_step_applied()) and loss_finite

    def _measure(self) -> None:
        if self._steps >= MEASURED_STEPS:
            return
        zo, params = self.engine.optimizer, list(self.engine.module.parameters())
        if self.stage == 3:
            held = tensor_bytes(p.ds_tensor for p in params) + tensor_bytes(params)  # partitions + anything gathered
            grads = tensor_bytes([getattr(zo, "grad_partitions_flat_buffer", None)]) + tensor_bytes(p.grad for p in params)
            master = tensor_bytes(zo.fp32_partitioned_groups_flat)
        else:
            held = tensor_bytes(params)
            averaged = getattr(zo, "averaged_gradients", None) or {}
            grads = tensor_bytes(p.grad for p in params) + tensor_bytes(t for g in averaged.values() for t in (g or []))
            master = tensor_bytes(zo.single_partition_of_fp32_groups)
        self.held.update(held, grads, optimizer_state_bytes(zo.optimizer) + master)

    def save_shards(self, folder: Path, optimizer=None) -> None:
        """Every process writes its partition (DeepSpeed's checkpoint format), collective."""
        self.engine.save_checkpoint(str(folder), tag=TAG, client_state={}, save_latest=False,
                                    exclude_frozen_parameters=True)

    def load_shards(self, folder: Path, optimizer=None, universal: bool = False) -> None:
        """Every process reads its partition back: from DeepSpeed's own checkpoint (written by as many
        processes), or with `universal` from a universal checkpoint (`to_universal`: any number)."""
        config = self.engine._config  # DeepSpeed reads its checkpoint.load_universal switch at load time only
        config.load_universal_checkpoint, was = universal, config.load_universal_checkpoint
        try:
            path, _ = self.engine.load_checkpoint(str(folder), tag=TAG, load_module_strict=False,
                                                  load_optimizer_states=True, load_lr_scheduler_states=False)
        finally:
            config.load_universal_checkpoint = was
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {folder}")


    def partition_without_parameters(self) -> bool:
        """Whether this process's partition of some parameter group holds padding only (a group smaller
        than the processes, e.g. a classifier's 2-element bias alone in the head's no-decay group):
        DeepSpeed 0.19's universal-checkpoint loader fails on such a partition (IndexError in
        load_hp_checkpoint_state_from_checkpoint_dir, measured with 3 processes)."""
        if self.stage == 3:
            return False
        return any(all(getattr(lp, "_hp_mapping", None) is None for lp in group)
                   for group in self.engine.optimizer.bit16_groups)


def to_universal(shards: Path, out: Path) -> None:
    """DeepSpeed's universal checkpoint (deepspeed.checkpoint.ds_to_universal: every parameter's fp32
    weights and AdamW moments whole, one folder each) from a ZeRO checkpoint, in this one process;
    `load_shards(out, universal=True)` partitions it for any number of processes. tunelab's checkpoints
    carry no universal_checkpoint_info (only Megatron-DeepSpeed's client code writes it); DeepSpeed's
    --inject_missing_state adds the version record the conversion requires."""
    from argparse import Namespace

    from deepspeed.checkpoint.ds_to_universal import main

    args = Namespace(input_folder=str(shards / TAG), output_folder=str(out / TAG), num_extract_workers=1,
                     num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    with redirect_stdout(io.StringIO()):  # it prints its progress
        main(args)


def consolidate(folder: Path) -> dict[str, torch.Tensor]:
    """The whole fp32 trainable weights of a ZeRO checkpoint, in this one process."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with redirect_stdout(io.StringIO()):  # it prints its progress
        state = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=TAG, exclude_frozen_parameters=True)
    return {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
