"""Which configurations fit the given hardware, ranked, with the command that runs each; what is missing
when none does.

The search: method (full, LoRA, QLoRA; only the one asked for when --method is given) x strategy
(ddp, zero1, zero2, zero3, fsdp, each sharded one also with --offload; QLoRA: ddp or fsdp, not
offloaded, as distributed.strategy runs it) x gradient checkpointing
(off, on) x the largest power-of-two micro-batch that fits, with the accumulation that keeps the
effective batch (micro-batch x accumulation x devices) of the spec. Per method and checkpointing
choice the fastest strategy that fits is kept, and the list is ranked by time: seconds per training
token of one optimizer step (model_plan.step_time: its FLOPs at the device's peak x MFU, the
collectives not hidden behind them, offload's host traffic; plan.comm). A sharded strategy can win
over ddp when the memory it frees takes a larger micro-batch (fewer accumulation steps, fewer
gathers), and an unsharded QLoRA over a sharded LoRA when the gathers cost more than the FLOPs
differ. At equal time the less-communicating strategy, then LoRA before QLoRA (QLoRA's
dequantisation is time the FLOPs do not show), then less memory per device.
"""

from __future__ import annotations

import math
import shlex

from tunelab.plan import memory
from tunelab.plan.model_plan import METHODS, Model, Spec, gib, plan_one, with_changes

COMM_ORDER = {"ddp": 0, "zero1": 1, "zero2": 2, "fsdp": 3, "zero3": 4}
# QLoRA runs under ddp and under fsdp (FSDP2 shards the 4-bit base, packed in bfloat16:
# models.quantization.quantization_for); distributed.sharded.check_strategy refuses it under zero*.
# Not offloaded: FSDP2's CPU offload of the packed 4-bit weights has not been tried.
QLORA_STRATEGIES = ("ddp", "fsdp")


def _strategies(method: str, devices: int, precision: str) -> list[tuple[str, bool]]:
    if precision == "fp16":  # sharding refuses fp16
        return [("ddp", False)]
    if devices == 1:
        return [("ddp", False)] + ([("zero3", False), ("zero3", True)] if method != "qlora" else [])
    if method == "qlora":
        return [(s, False) for s in QLORA_STRATEGIES]
    out = [(s, False) for s in memory.STRATEGIES] + [(s, True) for s in memory.STRATEGIES if s != "ddp"]
    return sorted(out, key=lambda so: (so[1], COMM_ORDER[so[0]]))


def largest_fitting(model: Model, spec: Spec) -> dict | None:
    """The spec at the largest power-of-two micro-batch (up to the effective per-device batch) that fits."""
    per_device_batch = spec.batch_size * spec.grad_accum
    b = 2 ** int(math.log2(per_device_batch))
    while b >= 1:
        candidate = with_changes(spec, batch_size=b, grad_accum=math.ceil(per_device_batch / b))
        p = plan_one(model, candidate)
        if p["fits"]:
            return p
        b //= 2
    return None


def seconds_per_token(p: dict) -> float:
    """The ranking's key: one optimizer step's seconds over the tokens it trains (plan_one's `step`)."""
    return p["step"]["seconds"] / p["step"]["tokens"]


def recommend(model: Model, spec: Spec, *, methods=None, limit: int = 6) -> list[dict]:
    methods = methods or METHODS
    found = []
    for method in methods:
        for ckpt in (False, True):
            fitting = []
            for strategy, offload in _strategies(method, spec.devices, spec.precision):
                plain = strategy != "ddp"  # 8-bit moments and bf16 weights run under ddp only
                cand = with_changes(spec, method=method, strategy=strategy, offload=offload,
                                    gradient_checkpointing=ckpt, optim="adamw" if plain else spec.optim,
                                    weights_dtype="fp32" if plain or method == "qlora" else spec.weights_dtype)
                p = largest_fitting(model, cand)
                if p is not None:
                    p["command"] = command(model, with_changes(cand, batch_size=p["micro_batch"],
                                                               grad_accum=p["grad_accum"]), **config_says(spec))
                    fitting.append(p)
            if fitting:  # min keeps the first of equals: _strategies lists the less-communicating first
                found.append(min(fitting, key=seconds_per_token))
    found.sort(key=lambda p: (seconds_per_token(p), METHODS.index(p["method"]), p["per_device"]["total_bytes"]))
    for rank, p in enumerate(found[:limit], 1):
        p["rank"] = rank
    return found[:limit]


def missing(model: Model, spec: Spec) -> str:
    """What would make something fit: more of these devices (for full / LoRA under zero3, QLoRA under
    fsdp, the sharding each runs with) or QLoRA."""
    lean = with_changes(spec, batch_size=1, gradient_checkpointing=True)
    parts = []
    q = plan_one(model, with_changes(lean, method="qlora", strategy="ddp", offload=False))
    for method, strategy in (("full", "zero3"), ("lora", "zero3"), ("qlora", "fsdp")):
        if method == "qlora" and q["fits"]:
            break
        need = devices_needed(model, with_changes(lean, method=method, strategy=strategy, offload=False))
        if need is not None and need <= spec.devices:
            parts.append(f"{method} (fits as it is with {strategy} + checkpointing at micro-batch 1)")
        elif need is not None:
            more = need - spec.devices
            parts.append(f"{more} more {spec.gpu.memory_gb:g} GB GPU{'s' if more != 1 else ''} for {method} "
                         f"({strategy} + checkpointing, micro-batch 1: {need} in all)")
    where = f"nothing fits on {spec.devices} x {spec.gpu.name} ({spec.gpu.memory_gb:g} GB): "
    if q["fits"]:
        parts.append("QLoRA (fits with checkpointing at micro-batch 1)")
    if parts:
        return where + "needs " + " or ".join(parts)
    short = q["per_device"]["total_bytes"] - spec.gpu.memory_bytes
    return (where + "no number of these devices is enough for full, LoRA or QLoRA (what is not sharded, "
            f"activations and overhead, does not fit one); unsharded, QLoRA needs {gib(short)} GiB more per device: "
            "a shorter --seq-len or a larger device")


def devices_needed(model: Model, spec: Spec, limit: int = 4096) -> int | None:
    """The fewest devices (whole nodes of spec.gpus) on which the spec fits; None beyond `limit`."""
    step = spec.gpus if spec.nodes > 1 else 1
    n = max(spec.devices, 1)
    while n <= limit:
        cand = with_changes(spec, gpus=n if step == 1 else spec.gpus, nodes=1 if step == 1 else n // step)
        if plan_one(model, cand)["fits"]:
            return n
        n = n + step if n < 64 else n * 2
    return None


def config_says(spec: Spec) -> dict:
    """What the command line's CONFIG.yaml already sets (`command`'s config_optim / config_weights): the
    spec's own values when it came from one, the defaults for a bare --model."""
    if spec.config_path:
        return {"config_optim": spec.optim, "config_weights": spec.weights_dtype}
    return {"config_optim": "adamw", "config_weights": "fp32"}


def command(model: Model, spec: Spec, config_optim: str = "adamw", config_weights: str = "fp32") -> str:
    """The `tunelab train` line for a configuration (keys as config.py and distributed.strategy spell them);
    `config_optim` / `config_weights`: the optim.name and train.weights_dtype the line's CONFIG.yaml says (a
    sharded line for an adamw_8bit or bf16-weights config sets adamw / fp32)."""
    sets = [] if spec.config_path else [f"model.name={spec.model}"]
    sets += [f"method={spec.method}", f"train.precision={spec.precision}", f"train.batch_size={spec.batch_size}",
             f"train.grad_accum={spec.grad_accum}", f"model.max_length={spec.seq_len}"]
    if spec.gradient_checkpointing:
        sets.append("train.gradient_checkpointing=true")
    if spec.method in ("lora", "qlora"):
        sets.append(f"lora.r={spec.lora_r}")
        targets = spec.lora_targets
        if not isinstance(targets, str):
            fused = [t for t in targets if t in ("q", "k", "v")]
            targets = [t for t in targets if t not in fused] + (["c_attn"] if fused else [])
            sets.append(f"lora.target_modules=[{','.join(targets)}]")
        elif targets != "auto":
            sets.append(f"lora.target_modules={targets}")
    if spec.optim != config_optim:
        sets.append(f"optim.name={spec.optim}")
    if spec.weights_dtype != config_weights:
        sets.append(f"train.weights_dtype={spec.weights_dtype}")
    if spec.strategy != "ddp":
        sets.append(f"distributed.strategy={spec.strategy}")
        if spec.offload:
            sets.append("distributed.cpu_offload=true")
    words = ["tunelab", "train", spec.config_path or "CONFIG.yaml"]
    if spec.devices > 1:
        words += ["--nproc", str(spec.gpus)]
    for s in sets:
        words += ["--set", s]
    line = " ".join(shlex.quote(w) for w in words)
    if spec.nodes > 1:  # the same line on every node, each with its own rank (train's multi-node flags)
        line += f" --nnodes {spec.nodes} --node-rank $NODE_RANK --master-addr $MASTER_ADDR"
    return line
