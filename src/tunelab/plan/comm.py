"""Communication per optimizer step: the collectives each strategy runs, their bytes, their time.

Both planners (plan.model_plan for other hardware, plan.planner for `--nproc` here) time one
device's computation; a data-parallel step also moves gradients (and, under parameter sharding,
weights) between the devices. tunelab counts those bytes here, by formula, rather than through a
library: none of the peers' estimators (accelerate, DeepSpeed's `estimate_zero3_model_states_mem_needs`)
gives communication time.

Ring collectives (NCCL's and gloo's algorithms; the "bus bandwidth" convention of nccl-tests'
PERFORMANCE.md): over N devices an all-reduce of B bytes moves 2(N-1)/N x B through each device's
link, a reduce-scatter or an all-gather (N-1)/N x B. With W the gathered weights (all parameters, in
the dtype the strategy computes with), W_t the trainable ones, G the gradients as reduced and A the
micro-batches of one step (grad_accum), per device and optimizer step:

    ddp    all-reduce G once per step (no_sync over the accumulation)      2(N-1)/N G
    zero1  reduce-scatter G at the step boundary, all-gather the updated W_t   (N-1)/N (G + W_t)
    zero2  reduce-scatter G every micro-batch (DeepSpeed partitions the gradients as they come),
           all-gather the updated W_t once                                     (N-1)/N (A G + W_t)
    zero3  every micro-batch: all-gather W in forward, again in backward what forward released,
           reduce-scatter G                                                    (N-1)/N A (W + W_re + G)
    fsdp   the same cut: forward gathers every unit, backward re-gathers the blocks (not the root,
           which FSDP2 keeps gathered; none under reshard_after_forward false)  (N-1)/N A (W + W_re + G)

(Rajbhandari et al. 2020, section 7: ZeRO-1/2 move 2 psi like DDP, ZeRO-3 3 psi, at A = 1 and equal
dtypes.) Under ZeRO-3, W_re is what DeepSpeed releases at the turn from forward to backward: a
parameter stays gathered while its next use lies within stage3_max_reuse_distance parameters
(plan.memory.zero3_gathered: all of a model under half that distance, so W_re = 0).

Time = bytes / link bandwidth (`LINKS`, per device and direction, GB/s = 1e9 bytes/s), at the
link's peak: a lower bound on the collective's own time. Several nodes: the ring crosses the
slowest link, the inter-node one. `overlap` is the share of it hidden behind computation (DDP's
buckets and FSDP/ZeRO-3's prefetch run beside backward on GPUs); the plans assume none (0, stated
in the output) so the time is an upper bound on communication's cost; pass --comm-overlap for yours.
On the CPU the collectives run on the cores that compute (gloo): nothing hides.

Offload (`distributed.cpu_offload`) adds traffic over each device's host link (`HOST_LINK`, its PCIe
generation), per device and optimizer step, W, W_re, G, W_t and A as above, each a 1/N partition:

    zero1  ZeRO-Offload: the gradient partition down once, the updated 16-bit weights up   (G + W_t) / N
    zero2  the gradient partition down every micro-batch (accumulated on the host)         (A G + W_t) / N
    zero3  + offload_param: every gather fetches its partition from the host; the update stays there
                                                                                           A (W + W_re + G) / N
    fsdp   CPUOffloadPolicy: every unshard copies the fp32 shard up, every reduce-scatter's fp32
           output comes down                                                               A (W32 + W32_re + G) / N

both directions added (no duplex overlap assumed), at the link's peak. The host's own optimizer step
(DeepSpeed's CPU Adam, torch's AdamW on the host shards) is not charged: offload time is a lower bound.
"""

from __future__ import annotations

from dataclasses import dataclass

from tunelab.errors import InputError
from tunelab.plan.memory import compute_bytes, layout_for, nf4_bits, zero3_gathered


@dataclass(frozen=True)
class Link:
    name: str
    gb_per_s: float  # per device and direction, 1e9 bytes/s
    source: str


LINKS = {k.name: k for k in [
    # NVIDIA datasheets give NVLink as total bidirectional bandwidth per GPU; half of it each way.
    Link("nvlink3", 300.0, "A100 SXM datasheet: NVLink 600 GB/s bidirectional"),
    Link("nvlink4", 450.0, "H100 / H200 SXM datasheets: NVLink 900 GB/s bidirectional"),
    Link("nvlink5", 900.0, "HGX B200 specifications: NVLink 1.8 TB/s bidirectional per GPU"),
    Link("infinity-fabric", 448.0, "AMD Instinct MI300X datasheet: 7 Infinity Fabric links, 896 GB/s peer "
                                   "bidirectional in all"),
    Link("pcie3", 16.0, "PCIe 3.0 x16: 8 GT/s x 16 lanes, 128b/130b (15.75 GB/s each way)"),
    Link("pcie4", 32.0, "PCIe 4.0 x16: 16 GT/s x 16 lanes (31.5 GB/s each way)"),
    Link("pcie5", 64.0, "PCIe 5.0 x16: 32 GT/s x 16 lanes (63 GB/s each way)"),
    # between nodes: one NIC per GPU, as DGX/HGX nodes are built
    Link("infiniband", 50.0, "InfiniBand NDR, 400 Gb/s per GPU (one ConnectX-7 per GPU, DGX H100)"),
    Link("ethernet", 12.5, "100 Gb/s Ethernet per node, shared"),
    # 2 CPU processes on this project's 2-core machine, 86.6 MB (MiniLM's fp32 gradients): DDP's step
    # took 0.058 s more than one process's compute (benchmarks/results/plan_accuracy_ddp.json, 0.426
    # vs 0.368 s) for 86.6 MiB all-reduced, 1.5 GB/s as exposed; gloo's own collectives timed alone
    # under the same machine's load (2 cores, another job at 180%): all-reduce 0.12 GB/s bus bandwidth,
    # all-gather / reduce-scatter 0.037, 2 ms a call (README: Planning)
    Link("gloo-loopback", 1.5, "measured: gloo on loopback, 2 CPU processes (DDP's step against one "
                               "process's compute, MiniLM)"),
]}
INTRA_NODE = {"A10G": "pcie4", "T4": "pcie3", "L4": "pcie4", "RTX4090": "pcie4", "A100-40GB": "nvlink3",
              "A100-80GB": "nvlink3", "H100": "nvlink4", "H100-PCIe": "pcie5", "H200": "nvlink4", "B200": "nvlink5",
              "MI300X": "infinity-fabric"}
INTER_NODE = "infiniband"
# each device's link to its host (offload's traffic): the PCIe generation of the board / HGX baseboard
HOST_LINK = {"A10G": "pcie4", "T4": "pcie3", "L4": "pcie4", "RTX4090": "pcie4", "A100-40GB": "pcie4",
             "A100-80GB": "pcie4", "H100": "pcie5", "H100-PCIe": "pcie5", "H200": "pcie5", "B200": "pcie5",
             "MI300X": "pcie5"}
DEFAULT_OVERLAP = 0.0


def link_for(gpu_name: str | None, nodes: int = 1, *, interconnect: str | None = None,
             gb_per_s: float | None = None) -> Link:
    """The link a ring crosses: `interconnect` by name, or the device's own (`INTRA_NODE`; PCIe 4 for a
    device not listed; gloo's loopback figure on the CPU) within one node and InfiniBand across nodes;
    `gb_per_s` overrides its bandwidth."""
    if interconnect is not None:
        if interconnect not in LINKS:
            raise InputError(f"unknown interconnect {interconnect!r}; known: {', '.join(LINKS)}",
                             field="--interconnect")
        link = LINKS[interconnect]
    elif nodes > 1:
        link = LINKS[INTER_NODE]
    elif gpu_name is None:
        link = LINKS["gloo-loopback"]
    else:
        link = LINKS[INTRA_NODE.get(gpu_name, "pcie4")]
    if gb_per_s is not None:
        link = Link(link.name, gb_per_s, "given on the command line (--link-bandwidth)")
    return link


def step_bytes(strategy: str, *, n: int, accum: int, weights: float, trainable_weights: float, gradients: float,
               regathered: float | None = None) -> dict:
    """Bytes each device sends per optimizer step, by collective (see the module's table). `weights`:
    the gathered weights (bytes), `trainable_weights` the updated ones zero1/2 all-gather, `gradients`
    the reduced gradients (bytes), `regathered` what zero3/fsdp gather again in backward (default:
    all of `weights`)."""
    if n <= 1:
        return {"total": 0.0}
    ring = (n - 1) / n
    if strategy == "ddp":
        out = {"all_reduce_gradients": 2 * ring * gradients}
    elif strategy == "zero1":
        out = {"reduce_scatter_gradients": ring * gradients, "all_gather_weights": ring * trainable_weights}
    elif strategy == "zero2":
        out = {"reduce_scatter_gradients": ring * accum * gradients, "all_gather_weights": ring * trainable_weights}
    elif strategy in ("zero3", "fsdp"):
        again = weights if regathered is None else regathered
        out = {"all_gather_weights": ring * accum * (weights + again), "reduce_scatter_gradients": ring * accum * gradients}
    else:
        raise ValueError(f"unknown strategy {strategy!r}")
    out["total"] = sum(out.values())
    return out


def step_seconds(bytes_per_step: dict, link: Link, overlap: float = DEFAULT_OVERLAP) -> dict:
    """The step's communication over `link`: all of it, and the part not hidden behind computation."""
    seconds = bytes_per_step["total"] / (link.gb_per_s * 1e9)
    return {"bytes_per_step": bytes_per_step["total"], "collectives": {k: v for k, v in bytes_per_step.items() if k != "total"},
            "seconds_per_step": seconds, "exposed_seconds_per_step": seconds * (1 - overlap), "overlap": overlap,
            "link": link.name, "link_gb_per_s": link.gb_per_s, "link_source": link.source}


def strategy_step_bytes(strategy: str, *, total: float, trainable: float, quantized: float = 0,
                        precision: str = "bf16", n: int = 1, accum: int = 1, root_params: float = 0,
                        reshard_after_forward: bool = True, weights_dtype: str = "fp32") -> dict:
    """`step_bytes` from parameter counts, in the dtypes tunelab's strategies communicate in: DDP
    all-reduces its fp32 gradients (autocast over fp32 parameters; bf16 ones under train.weights_dtype
    bf16), FSDP2 gathers in the compute
    dtype (MixedPrecisionPolicy param_dtype) and reduces in fp32 (reduce_dtype), DeepSpeed gathers
    and reduces its 16-bit weights and gradients (fp32 in fp32); a QLoRA base is gathered in NF4.
    What backward gathers again: under zero3 what `memory.zero3_gathered` does not keep, under fsdp
    every block (`total - root_params`) unless reshard_after_forward is off."""
    act = compute_bytes(precision)
    weights = (total - quantized) * act + quantized * nf4_bits() / 8
    grad_bytes = act if layout_for(strategy, weights_dtype) in ("zero", "bf16") else 4
    again = regathered_params(strategy, total, root_params, reshard_after_forward)
    regathered = None if again is None else again * act
    return step_bytes(strategy, n=n, accum=accum, weights=weights, trainable_weights=trainable * act,
                      gradients=trainable * grad_bytes, regathered=regathered)


def regathered_params(strategy: str, total: float, root_params: float = 0,
                      reshard_after_forward: bool = True) -> float | None:
    """Parameters backward gathers again (None where the strategy gathers no weights): under zero3
    what `memory.zero3_gathered` does not keep across the turn, under fsdp every block (`total -
    root_params`) unless reshard_after_forward is off."""
    if strategy == "zero3":
        return max(0.0, total - zero3_gathered(total))
    if strategy == "fsdp":
        return max(0.0, total - root_params) if reshard_after_forward else 0.0
    return None


def host_link_for(gpu_name: str | None) -> Link | None:
    """The device's link to host memory (PCIe 4 for a device not listed); None on the CPU, where the
    host is the device and offload moves nothing."""
    if gpu_name is None:
        return None
    return LINKS[HOST_LINK.get(gpu_name, "pcie4")]


def offload_step_bytes(strategy: str, *, total: float, trainable: float, precision: str = "bf16", n: int = 1,
                       accum: int = 1, root_params: float = 0, reshard_after_forward: bool = True) -> dict:
    """Bytes each device moves to and from host memory per optimizer step under offload (the module's
    second table); zero for ddp, which offloads nothing."""
    n = max(1, n)
    act = compute_bytes(precision)
    if strategy in ("zero1", "zero2"):
        down = (1 if strategy == "zero1" else accum) * trainable * act / n
        up = trainable * act / n
    elif strategy in ("zero3", "fsdp"):
        again = regathered_params(strategy, total, root_params, reshard_after_forward)
        # fsdp: tunelab's sharded parameters (the master) are fp32, and so is reduce_dtype
        size = act if strategy == "zero3" else 4
        up, down = accum * (total + again) * size / n, accum * trainable * size / n
    elif strategy == "ddp":
        up = down = 0.0
    else:
        raise ValueError(f"unknown strategy {strategy!r}")
    return {"host_to_device": up, "device_to_host": down, "total": up + down}


def offload_seconds(per_step: dict, link: Link | None) -> dict:
    """The step's host traffic over `link` (None: the CPU, nothing moves)."""
    if link is None:
        return {"bytes_per_step": 0.0, "host_to_device": 0.0, "device_to_host": 0.0, "seconds_per_step": 0.0,
                "link": None, "link_gb_per_s": None}
    return {"bytes_per_step": per_step["total"], "host_to_device": per_step["host_to_device"],
            "device_to_host": per_step["device_to_host"],
            "seconds_per_step": per_step["total"] / (link.gb_per_s * 1e9), "link": link.name,
            "link_gb_per_s": link.gb_per_s,
            "note": "both directions added, at the link's peak; the host's optimizer step is not charged"}
