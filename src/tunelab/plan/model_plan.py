"""`tunelab plan --model ...`: memory per device, time and cost of a run on hardware you do not have.

Where `planner.make_plan` measures a config on this machine, this plans from the architecture
alone (`arch`: config.json on the meta device), the ZeRO / Korthikanti / QLoRA formulas
(`memory`), FLOPs x peak x MFU (`timecost`) and a table of accelerators (`hardware`), so an 8B or
70B model costs the same second to plan as a tiny one. `recommend` searches the configurations
that fit; `cli.plan` turns the flags (or a CONFIG.yaml they override) into a `Spec`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from tunelab.config import TrainConfig
from tunelab.errors import InputError
from tunelab.plan import arch, comm, memory, timecost
from tunelab.plan.hardware import Accelerator

METHODS = ("full", "lora", "qlora")
_TRAIN = TrainConfig.model_fields
PER_DEVICE_KEYS = ("weights_bytes", "gradients_bytes", "optimizer_bytes", "master_weights_bytes",
                   "model_states_bytes", "activations_bytes", "logits_bytes", "overhead_bytes", "total_bytes")


@dataclass
class Spec:
    """One configuration to plan: model, method, shape, hardware, strategy."""

    model: str
    gpu: Accelerator
    task: str | None = None  # None: causal_lm for decoders, classification for encoders
    num_labels: int = 2
    method: str = "full"
    lora_r: int = 8
    lora_targets: list[str] | str = "auto"
    lora_dropout: float = 0.05  # tunelab's lora.dropout default
    lora_lean_dropout: bool = True  # lora.lean_dropout's default (models/lora_dropout.py)
    lora_recompute_inputs: bool = True  # lora.recompute_inputs' default (models/recompute.py)
    lora_base_dtype: str = "auto"  # lora.base_dtype (models/frozen_weights.py); fp32 under DoRA
    seq_len: int = 2048
    batch_size: int = 1  # micro-batch per device
    grad_accum: int = 1
    precision: str = "bf16"
    optim: str = "adamw"  # optim.name; adamw_8bit runs under ddp only
    weights_dtype: str = "fp32"  # train.weights_dtype; bf16 runs under ddp only, computes in bf16
    gradient_checkpointing: bool = False
    attention: str = "sdpa"  # sdpa / flash (fused, no s x s scores) or eager
    gpus: int = 1  # per node
    nodes: int = 1
    strategy: str = "ddp"
    offload: bool = False
    tokens: float | None = None  # training tokens (all epochs), for time and cost
    mfu: float = timecost.DEFAULT_MFU
    price_per_hour: float | None = None
    interconnect: str | None = None  # plan.comm.LINKS name; None: the device's own, InfiniBand across nodes
    link_gb_per_s: float | None = None  # overrides the link's bandwidth (GB/s per device and direction)
    comm_overlap: float = comm.DEFAULT_OVERLAP  # share of the collectives hidden behind computation
    reshard_after_forward: bool = True  # distributed.reshard_after_forward (fsdp)
    trust_remote_code: bool = False
    # the causal-LM switches (train.*, tasks/lm_speed.py), their config defaults unless a CONFIG.yaml says
    loss_chunk_tokens: int = _TRAIN["loss_chunk_tokens"].default
    recompute_norms: bool = _TRAIN["recompute_norms"].default
    recompute_mlp_activation: bool = _TRAIN["recompute_mlp_activation"].default
    packing: bool = False  # data.packing
    packed_attention: str = _TRAIN["packed_attention"].default
    config_path: str | None = None  # the CONFIG.yaml the printed command trains, when there is one
    extra: dict = field(default_factory=dict)

    @property
    def devices(self) -> int:
        return self.gpus * self.nodes


def computes_under_autocast(strategy: str) -> bool:
    """DDP (and one process) runs fp32 modules under torch.autocast: an fp32 residual stream, a 16-bit
    cast of each projection's input and of each weight. FSDP2's MixedPrecisionPolicy(param_dtype=bf16)
    and DeepSpeed's bf16 engine run 16-bit modules instead."""
    return strategy == "ddp"


class Model:
    """The meta model of a spec and the counts every configuration of it shares (built once)."""

    def __init__(self, spec: Spec):
        self.config = arch.read_config(spec.model, trust_remote_code=spec.trust_remote_code)
        self.task = spec.task or arch.default_task(self.config)
        self.module = arch.build_meta(self.config, self.task, spec.num_labels)
        self.shape = arch.shape_of(self.config, self.task)
        self.counts = arch.counts(self.module, self.task)
        self.head = arch.head_params(self.module, self.task)
        self._lora: dict = {}
        self.unit_params = arch.gathered_unit_params(self.module)
        self.root_params = arch.root_unit_params(self.module)[0]  # FSDP2's root unit (plan.memory.fsdp_root_bytes)
        self.frozen_linear = arch.plain_linear_params(self.module, self.task)  # what lora.base_dtype stores in bf16

    def lora(self, targets, r: int) -> dict:
        key = (tuple(targets) if not isinstance(targets, str) else targets, r)
        if key not in self._lora:
            self._lora[key] = arch.lora_params(self.module, self.task, targets, r)
        return self._lora[key]


def switches(model: Model, spec: Spec) -> dict:
    """The causal-LM switches as training applies them to this configuration (tasks/lm_speed.py): the
    loss in chunks unless FSDP2 or ZeRO-3 shard the head's weight (train.chunked_loss.takes_head: then
    the plain loss); norms and the gated MLP's activation recomputed unless gradient checkpointing
    recomputes everything; the packed
    attention route where rows are packed. Classification runs none of them."""
    lm = model.task != "classification"
    chunk = spec.loss_chunk_tokens if lm and spec.strategy not in ("fsdp", "zero3") else 0
    recompute = lm and not spec.gradient_checkpointing
    return {"loss_chunk_tokens": chunk, "recompute_norms": recompute and spec.recompute_norms,
            "recompute_mlp_activation": recompute and spec.recompute_mlp_activation,
            "packed_attention": spec.packed_attention if lm and spec.packing else None}


def stores_base_bf16(model: Model, spec: Spec) -> bool:
    """Whether lora.base_dtype stores the frozen base's Linear weights in bf16 (run._store_frozen_base):
    method lora (auto or bf16) under bf16 autocast with fp32 weights."""
    if spec.method != "lora" or spec.lora_base_dtype == "fp32" or spec.weights_dtype == "bf16":
        return False
    if not computes_under_autocast(spec.strategy) or spec.precision != "bf16":
        return False
    return True


def params_for(model: Model, spec: Spec) -> dict:
    """Total, trainable, adapter and 4-bit parameters of the spec's method."""
    total = model.counts["total"]
    if spec.method == "full":
        return {"total": total, "trainable": total, "adapter": 0, "quantized": 0}
    lora = model.lora(spec.lora_targets, spec.lora_r)
    trainable = lora["params"] + model.head
    quantized = model.counts["quantizable"] if spec.method == "qlora" else 0
    return {"total": total + lora["params"], "trainable": trainable, "adapter": lora["params"], "quantized": quantized,
            "targets": lora["targets"]}


def per_device(model: Model, spec: Spec, params: dict | None = None) -> dict:
    """The itemised bytes on each device (the `per_device` object) and what goes to host memory."""
    params = params or params_for(model, spec)
    states = memory.device_states(params["total"], params["trainable"], quantized=params["quantized"],
                                  precision=spec.precision, strategy=spec.strategy, n=spec.devices,
                                  offload=spec.offload, optim=spec.optim, weights_dtype=spec.weights_dtype,
                                  # a block's adapters are gathered with it
                                  unit_params=model.unit_params + params["adapter"] / max(1, model.shape.layers),
                                  root_params=model.root_params,  # a full fine-tune trains the root; LoRA its head
                                  root_trainable=model.root_params if spec.method == "full" else model.head)
    act_bytes = memory.compute_bytes(spec.precision)
    # tunelab's autocast keeps the residual stream (embeddings + residual adds) in fp32: norm inputs too;
    # bf16 weights (train.weights_dtype) compute in bf16 throughout, with no weight copies
    autocast = computes_under_autocast(spec.strategy) and act_bytes == 2 and spec.weights_dtype != "bf16"
    norm_bytes = 4 if autocast else act_bytes
    lora = None
    if spec.method != "full":
        lora = {"roles": model.lora(spec.lora_targets, spec.lora_r)["roles"], "r": spec.lora_r,
                "dropout": spec.lora_dropout, "lean_dropout": spec.lora_lean_dropout,
                "recompute_inputs": spec.lora_recompute_inputs}
    sw = switches(model, spec)
    chunk = sw["loss_chunk_tokens"]
    acts = memory.activations(model.shape, spec.seq_len, spec.batch_size, act_bytes=act_bytes,
                              norm_bytes=norm_bytes, attention=spec.attention,
                              checkpointing=spec.gradient_checkpointing, autocast=autocast, lora=lora,
                              recompute_norms=sw["recompute_norms"], packed=sw["packed_attention"],
                              chunked_loss=bool(chunk), recompute_act=sw["recompute_mlp_activation"])
    if autocast and spec.strategy == "ddp":  # autocast's 16-bit copy of each matmul weight, kept for backward
        casts = model.counts["output_projection"] if spec.method == "qlora" else model.counts["matmul"]
        casts -= model.counts["output_projection"] if chunk else 0  # the chunked loss casts the head's for its forward only
        if stores_base_bf16(model, spec):  # lora.base_dtype: the frozen Linear weights in bf16, no copies of them
            casts -= model.frozen_linear
            states["weights"] -= 2 * model.frozen_linear
            states["model_states"] -= 2 * model.frozen_linear
        states["weights"] += 2 * max(0, casts)
        states["model_states"] += 2 * max(0, casts)
    if model.task == "classification":
        logits = memory.loss_bytes(spec.batch_size, spec.num_labels, model.shape.hidden, act_bytes=act_bytes)["peak"]
    else:
        # DeepSpeed's 16-bit engine; bf16 weights
        head_bytes = 2 if (states["layout"] == "zero" and act_bytes == 2) or states["layout"] == "bf16" else 4
        logits = memory.loss_bytes(spec.batch_size * spec.seq_len, model.shape.vocab, model.shape.hidden,
                                   act_bytes=act_bytes, hidden_bytes=norm_bytes, chunk=chunk,
                                   head_trains=spec.method == "full", weight_bytes=head_bytes)["peak"]
    overhead = memory.CUDA_CONTEXT_BYTES + states["buffers"]
    out = {"weights_bytes": states["weights"], "gradients_bytes": states["gradients"],
           "optimizer_bytes": states["optimizer"], "master_weights_bytes": states["master_weights"],
           "model_states_bytes": states["model_states"], "activations_bytes": acts["total"],
           "logits_bytes": logits, "overhead_bytes": overhead}
    out["total_bytes"] = out["model_states_bytes"] + acts["total"] + logits + overhead
    out = {k: int(round(v)) for k, v in out.items()}
    return {"per_device": out, "cpu_bytes": int(states["cpu"]), "activations": acts, "layout": states["layout"],
            "switches": sw}


def flops_for(model: Model, spec: Spec, params: dict) -> dict:
    per_token = timecost.flops_per_token(
        matmul_params=model.counts["matmul"], adapter_params=params["adapter"], method=spec.method,
        layers=model.shape.layers, seq_len=spec.seq_len, attn_dim=model.shape.heads * model.shape.head_dim,
        checkpointing=spec.gradient_checkpointing)
    out = {"per_token": per_token["total"], "per_token_weights": per_token["weights"],
           "per_token_attention": per_token["attention"]}
    out["total"] = per_token["total"] * spec.tokens if spec.tokens else None
    return out


def check_spec(spec: Spec) -> None:
    """Combinations no strategy runs: an input error naming the flag."""
    if spec.method not in METHODS:
        raise InputError(f"--method must be one of {', '.join(METHODS)}", field="--method")
    if spec.strategy not in memory.STRATEGIES:
        raise InputError(f"--strategy must be one of {', '.join(memory.STRATEGIES)}", field="--strategy")
    if spec.offload and spec.strategy == "ddp":
        raise InputError("--offload needs a sharding strategy (zero1, zero2, zero3 or fsdp); ddp keeps "
                         "everything on the device", field="--offload")
    if spec.precision == "fp16" and spec.strategy != "ddp":
        raise InputError("fp16 does not combine with sharding (distributed.strategy refuses it): use bf16 or "
                         "--strategy ddp", field="--precision")
    if spec.optim not in memory.OPTIMIZERS:
        raise InputError(f"optim.name must be one of {', '.join(memory.OPTIMIZERS)}", field="optim.name")
    if spec.optim == "adamw_8bit" and spec.strategy != "ddp":
        raise InputError("optim.name adamw_8bit runs under ddp only (its moments are not sharded): use --strategy "
                         "ddp or optim.name adamw", field="--strategy")
    if spec.attention not in ("sdpa", "flash", "eager"):
        raise InputError("--attention must be sdpa, flash or eager", field="--attention")
    if spec.weights_dtype not in ("fp32", "bf16"):
        raise InputError("--weights-dtype must be fp32 or bf16", field="--weights-dtype")
    if spec.weights_dtype == "bf16":  # as config.py refuses it (train.weights_dtype)
        if spec.strategy != "ddp":
            raise InputError("bf16 weights (train.weights_dtype) run under ddp only (the sharded engines keep fp32 "
                             "masters): use --strategy ddp or --weights-dtype fp32", field="--strategy")
        if spec.precision != "bf16":
            raise InputError("bf16 weights compute in bf16: use --precision bf16 or --weights-dtype fp32",
                             field="--precision")
        if spec.method == "qlora":
            raise InputError("bf16 weights do not combine with qlora (a 4-bit base): use --method lora or "
                             "--weights-dtype fp32", field="--method")



def plan_one(model: Model, spec: Spec) -> dict:
    """One configuration: memory per device, FLOPs, time, cost, whether it fits."""
    params = params_for(model, spec)
    mem = per_device(model, spec, params)
    fl = flops_for(model, spec, params)
    out = {"method": spec.method, "strategy": spec.strategy, "offload": spec.offload, "optim": spec.optim,
           "weights_dtype": spec.weights_dtype,
           "precision": spec.precision,
           "gradient_checkpointing": spec.gradient_checkpointing, "attention": spec.attention, **mem["switches"],
           "micro_batch": spec.batch_size, "grad_accum": spec.grad_accum, "seq_len": spec.seq_len,
           "devices": spec.devices, "gpus_per_node": spec.gpus, "nodes": spec.nodes,
           "effective_batch": spec.batch_size * spec.grad_accum * spec.devices,
           "total_params": params["total"], "trainable_params": params["trainable"],
           "adapter_params": params["adapter"], "quantized_params": params["quantized"],
           "per_device": mem["per_device"], "cpu_bytes": mem["cpu_bytes"], "layout": mem["layout"],
           "device_memory_bytes": spec.gpu.memory_bytes,
           "fits": mem["per_device"]["total_bytes"] <= spec.gpu.memory_bytes, "flops": fl, "tokens": spec.tokens}
    if params.get("targets") is not None:
        out["lora"] = {"r": spec.lora_r, "targets": params["targets"]}
    out["communication"] = communication_for(model, spec, params)
    out["offload_traffic"] = offload_for(model, spec, params) if spec.offload else None
    out["step"] = step_time(spec, fl, out["communication"], out["offload_traffic"])
    out["time"] = None
    if fl["total"]:
        steps = spec.tokens / out["step"]["tokens"]
        out["time"] = timecost.time_and_cost(fl["total"], devices=spec.devices,
                                             peak_flops=spec.gpu.peak_flops(spec.precision), mfu=spec.mfu,
                                             price_per_hour=spec.price_per_hour,
                                             comm_seconds=steps * out["step"]["communication_seconds"],
                                             offload_seconds=steps * out["step"]["offload_seconds"])
    return out


def step_time(spec: Spec, flops: dict, communication: dict, offload: dict | None) -> dict:
    """One optimizer step's time (what the recommendations are ranked by; it needs no --tokens): the
    FLOPs of its tokens at devices x peak x MFU, the collectives not hidden behind them, and offload's
    host traffic."""
    tokens = spec.seq_len * spec.batch_size * spec.grad_accum * spec.devices
    compute = flops["per_token"] * tokens / (spec.devices * spec.gpu.peak_flops(spec.precision) * spec.mfu)
    exposed = communication["exposed_seconds_per_step"]
    host = offload["seconds_per_step"] if offload else 0.0
    seconds = compute + exposed + host
    return {"tokens": tokens, "compute_seconds": compute, "communication_seconds": exposed, "offload_seconds": host,
            "seconds": seconds, "tokens_per_second": tokens / seconds}


def offload_for(model: Model, spec: Spec, params: dict) -> dict:
    """The host traffic of one optimizer step under --offload (plan.comm's offload table)."""
    per_step = comm.offload_step_bytes(spec.strategy, total=params["total"], trainable=params["trainable"],
                                       precision=spec.precision, n=spec.devices, accum=spec.grad_accum,
                                       root_params=model.root_params, reshard_after_forward=spec.reshard_after_forward)
    return comm.offload_seconds(per_step, comm.host_link_for(spec.gpu.name))


def communication_for(model: Model, spec: Spec, params: dict) -> dict:
    """The collectives of one optimizer step over the spec's link (plan.comm)."""
    per_step = comm.strategy_step_bytes(spec.strategy, total=params["total"], trainable=params["trainable"],
                                        quantized=params["quantized"], precision=spec.precision, n=spec.devices,
                                        accum=spec.grad_accum, root_params=model.root_params,
                                        reshard_after_forward=spec.reshard_after_forward,
                                        weights_dtype=spec.weights_dtype)
    link = comm.link_for(spec.gpu.name, spec.nodes, interconnect=spec.interconnect, gb_per_s=spec.link_gb_per_s)
    return comm.step_seconds(per_step, link, spec.comm_overlap)


def with_changes(spec: Spec, **changes) -> Spec:
    return replace(spec, **changes)


def gib(n: float) -> float:
    return round(n / 2**30, 2)


def ceil_div(a: int, b: int) -> int:
    return max(1, math.ceil(a / b))
