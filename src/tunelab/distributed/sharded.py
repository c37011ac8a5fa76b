"""What the sharded strategies (fsdp: torch FSDP2; zero1/2/3: DeepSpeed) share: the choice of
strategy and its load-time refusals, the micro-batch share, evaluation by every process, the bytes
each process really holds, and the plain model rebuilt from a sharded checkpoint for final/.

Why every process evaluates under fsdp and zero3: their parameters live in pieces, one per process,
and a forward pass gathers each block from all of them, so no process can run the model alone.
Every process runs the same evaluation over the same batches (the gathered weights are equal, so
are the results) and rank 0's numbers are broadcast, exactly as DDP's rank-0 evaluation gives
every process the same best-checkpoint and early-stopping decisions.

Why final/ is rebuilt from the checkpoint files: the sharded model object cannot leave its
process group, but the checkpoint on disk (DCP for fsdp, DeepSpeed's for zero*) can be
consolidated by one process. Before sharding, rank 0 keeps a skeleton of the model (trainable
parameters on the meta device, frozen ones real: they are not in the checkpoint); at the end the
shipped checkpoint's full weights are loaded into it, and final/, the final evaluation and the
forgetting probe run on that plain model exactly as with one process.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch

from tunelab.distributed.group import Group
from tunelab.errors import InputError

SHARDED = ("fsdp", "zero1", "zero2", "zero3")
SHARDS = "shards"  # the folder inside a checkpoint that every process writes its shard into


def strategy_of(configured: str, world_size: int) -> str:
    """The strategy this run uses: the configured one (distributed.strategy) with several processes,
    none alone."""
    return configured if world_size > 1 else "single"


def check_strategy(world_size: int, *, strategy: str, task: str, method: str, precision: str, regularization,
                   final: str) -> None:
    """Refuse, at load time, what a sharded strategy cannot do (and say what to do instead).

    The keys it judges: distributed.strategy, task, method, train.precision, the regularization
    section (l2sp, ewc, mixout) and checkpoint.final."""
    strategy = strategy_of(strategy, world_size)
    if strategy not in SHARDED:
        return
    if method == "qlora" and strategy != "fsdp":
        raise InputError(f"method qlora is not supported with distributed.strategy {strategy} (not tried with "
                         "DeepSpeed's partitioning of the packed 4-bit weights); use distributed.strategy fsdp (the "
                         "4-bit base sharded) or ddp", field="method")
    if precision == "fp16":
        raise InputError(f"train.precision fp16 needs a gradient scaler that {strategy} does not share here; "
                         "use train.precision bf16 (or fp32)", field="train.precision")
    r = regularization
    for key, value in (("l2sp", r.l2sp), ("ewc", r.ewc), ("mixout", r.mixout)):
        if value:
            raise InputError(f"regularization.{key} reads every weight of the model in one place, which "
                             f"distributed.strategy {strategy} splits across processes; remove it or use "
                             "distributed.strategy ddp", field=f"regularization.{key}")
    if final == "best_or_base":
        raise InputError(f"checkpoint.final best_or_base keeps the untouched model in one file, which distributed.strategy "
                         f"{strategy} does not write yet; use checkpoint.final best", field="checkpoint.final")
    if method == "feature_extraction":
        raise InputError("method feature_extraction trains only a small head: there is nothing to shard; "
                         "use distributed.strategy ddp", field="distributed.strategy")


def share_evenly(window: list[list[int]], rank: int, world_size: int) -> list[tuple[list[int], bool]]:
    """This process's micro-batches of one optimizer step, padded so every process runs as many.

    A sharded forward gathers each block's parameters from all processes, so every process must
    run the same number of forwards and backwards; a process short of micro-batches at an epoch's
    end runs zero-weight copies (it joins the collectives, its gradient contribution is 0).
    """
    mine = window[rank::world_size]
    n = math.ceil(len(window) / world_size)
    return [(idx, True) for idx in mine] + [(window[0], False)] * (n - len(mine))


def broadcast_result(group: Group, fn, *args):
    """fn(*args) run by every process (the weights are in pieces), rank 0's result given to all."""
    result = fn(*args)
    return group.broadcast(result if group.is_main else None)


def tensor_bytes(tensors) -> int:
    """Bytes of the local storage of these tensors (a DTensor counts its own shard only)."""
    total = 0
    for t in tensors:
        if t is None or not torch.is_tensor(t):
            continue
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of an optimizer's per-parameter state tensors (AdamW's exp_avg, exp_avg_sq), local shards."""
    return tensor_bytes(v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v) and v.dim() > 0)


class HeldBytes:
    """The most bytes of parameters, gradients and optimizer state this process held at once,
    read from the tensors it owns at a few points of the first steps (after each micro-batch's
    backward, before and after the optimizer step)."""

    def __init__(self):
        self.param_bytes = self.grad_bytes = self.optimizer_bytes = 0
        self.samples = 0

    def update(self, params: int | None = None, grads: int | None = None, optimizer: int | None = None) -> None:
        self.samples += 1
        self.param_bytes = max(self.param_bytes, params or 0)
        self.grad_bytes = max(self.grad_bytes, grads or 0)
        self.optimizer_bytes = max(self.optimizer_bytes, optimizer or 0)

    def row(self, rank: int) -> dict:
        return {"rank": rank, "param_bytes": self.param_bytes, "grad_bytes": self.grad_bytes,
                "optimizer_bytes": self.optimizer_bytes}


def skeleton_of(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` whose trainable parameters are empty meta tensors (no memory) and whose
    frozen parameters and buffers are real: the frame final/ is rebuilt in from a checkpoint."""
    memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=True)
            for p in model.parameters() if p.requires_grad}
    return copy.deepcopy(model, memo)


def fill_skeleton(skeleton: torch.nn.Module, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Load the consolidated trainable weights into the skeleton; every meta parameter must get one."""
    names = {n for n, p in skeleton.named_parameters(remove_duplicate=False) if p.is_meta}
    missing = sorted(names - set(weights))
    if missing:
        raise RuntimeError(f"the sharded checkpoint lacks {len(missing)} trainable weight(s), e.g. {missing[:3]}")
    skeleton.load_state_dict(weights, strict=False, assign=True)
    if hasattr(skeleton, "tie_weights"):  # assign=True gives tied names separate (equal) tensors
        skeleton.tie_weights()
    return skeleton  # load_state_dict(assign=True) keeps each parameter's requires_grad


def full_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The trainable weights of a sharded checkpoint, consolidated in this one process (fp32, CPU)."""
    shards = checkpoint / SHARDS
    if (shards / ".metadata").is_file():
        from tunelab.distributed.fsdp import consolidate

        return consolidate(shards)
    from tunelab.distributed.zero import consolidate

    return consolidate(shards)


class ShardedRun:
    """What a sharded run keeps beside the recipe: the loop's replicas, rank 0's skeleton for
    final/, and every process's bytes held (gathered at the end for summary.json)."""

    def __init__(self, distributed, train, group: Group, skeleton: torch.nn.Module | None):
        """`distributed`, `train`: the config's sections (strategy, cpu_offload; batch_size, max_grad_norm)."""
        self.distributed, self.train, self.group, self.skeleton = distributed, train, group, skeleton
        self.strategy = distributed.strategy
        self.replicas = None
        self.ranks: list[dict] | None = None
        self.ckpt_root: Path | None = None  # the run's checkpoints/, known to every process (run.open_run)

    def start(self, model: torch.nn.Module, loss_fn, optimizer, precision: str) -> None:
        """After the optimizer is built: DeepSpeed's engine takes model, loss and optimizer (fsdp has
        sharded the model before the optimizer existed, see `shard_before_optimizer`)."""
        if self.replicas is not None:
            return
        from tunelab.distributed.zero import ZeroReplicas, deepspeed_config, start_engine

        stage = int(self.strategy[-1])
        config = deepspeed_config(stage, batch_size=self.train.batch_size, max_grad_norm=self.train.max_grad_norm,
                                  precision=precision, cpu_offload=self.distributed.cpu_offload)
        self.replicas = ZeroReplicas(start_engine(model, loss_fn, optimizer, self.group, config), self.group, stage)

    def gather_held(self, device: torch.device | None = None) -> None:
        """Every process's bytes held and peak memory so far, on rank 0 (collective)."""
        from tunelab.run_dir import peak_memory_mb

        row = {**self.replicas.held.row(self.group.rank),
               "peak_memory_mb": round(peak_memory_mb(device or torch.device("cpu")), 1)}
        self.ranks = self.group.gather(row)

    def summary(self) -> dict:
        return {"strategy": self.strategy, "cpu_offload": self.distributed.cpu_offload,
                "world_size": self.group.world_size, "ranks": self.ranks}

    def plain_model(self, checkpoint: Path) -> torch.nn.Module:
        """Rank 0's skeleton with the checkpoint's weights, consolidated from its shards: a plain model."""
        return fill_skeleton(self.skeleton, full_weights(checkpoint))


def shard_before_optimizer(distributed, train, model: torch.nn.Module, loss_fn, group: Group, precision: str,
                           device: torch.device) -> ShardedRun | None:
    """For a sharded strategy with several processes: rank 0 keeps the skeleton, and fsdp shards the
    model now (its optimizer must see the sharded parameters). None for ddp or a process alone.
    `distributed`, `train`: the config's sections."""
    if strategy_of(distributed.strategy, group.world_size) not in SHARDED:
        return None
    run = ShardedRun(distributed, train, group, skeleton_of(model) if group.is_main else None)
    if run.strategy == "fsdp":
        from tunelab.distributed.fsdp import FullyShardedReplicas, shard_model

        d = distributed
        root = shard_model(model, loss_fn, precision=precision, cpu_offload=d.cpu_offload,
                           reshard_after_forward=d.reshard_after_forward, device=device)
        run.replicas = FullyShardedReplicas(root, group)
    return run


class ShardedRunIO:
    """The loop's io for a sharded run: as distributed.ddp.SharedRunIO (rank 0 logs and writes),
    except that a checkpoint's weights and optimizer state are written by every process, each its
    shard, into a staging folder that rank 0 then moves into the atomic checkpoint folder."""

    def __init__(self, shared, run: ShardedRun, optimizer, ckpt_root: Path):
        self.shared, self.run, self.optimizer, self.ckpt_root = shared, run, optimizer, ckpt_root

    def request_stop(self, *args):
        self.shared.request_stop(*args)

    def stop_requested(self) -> bool:
        return self.shared.stop_requested()

    def log(self, row: dict) -> None:
        self.shared.log(row)

    def step_done(self, step: int, loop_seconds: float) -> None:
        if hasattr(self.shared, "step_done"):
            self.shared.step_done(step, loop_seconds)

    def save(self, state, tracker, is_best: bool, metrics: dict | None = None) -> None:
        import shutil

        from tunelab.train import checkpoint as ckpt

        group = self.run.group
        rng = group.gather(ckpt.rng_state())
        staging = self.ckpt_root / f".tmp-shards-{ckpt.checkpoint_name(state.step)}"
        if group.is_main:
            shutil.rmtree(staging, ignore_errors=True)
            self.ckpt_root.mkdir(parents=True, exist_ok=True)
        group.barrier()
        self.run.replicas.save_shards(staging, self.optimizer)
        group.barrier()  # every shard is on disk before rank 0 seals the checkpoint
        if self.shared.run_dir is not None:
            self.shared.run_dir.save(state, tracker, is_best, metrics, rank_rng=rng, shards=staging)
        group.barrier()
