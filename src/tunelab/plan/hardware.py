"""Accelerators the planner knows by name: memory and dense peak throughput, from vendor datasheets.

`tunelab plan --gpu NAME` looks a device up here; `--gpu-memory GB --gpu-tflops T` describes one
that is not listed. Peaks are *dense* (no 2:4 structured sparsity: datasheets print the sparse
figure first, twice the dense one) tensor-core bf16/fp16 with fp32 accumulation, the mode
mixed-precision training runs in; `fp32_tflops` is the plain (non-tensor-core) fp32 peak, which is
what PyTorch's fp32 matmuls get with TF32 off (its default). Memory is the marketed "GB" figure,
read as GiB (2**30 bytes), which is what the A100/H100 boards physically carry; the CUDA context
and allocator reserve come off it as the plan's `overhead_bytes`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tunelab.errors import InputError

GIB = 2**30


@dataclass(frozen=True)
class Accelerator:
    name: str
    memory_gb: float  # GiB on the board
    bf16_tflops: float  # dense tensor-core bf16/fp16, fp32 accumulate
    fp32_tflops: float  # non-tensor fp32
    source: str

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gb * GIB)

    def peak_flops(self, precision: str) -> float:
        """FLOP/s at this precision: the tensor-core peak for bf16/fp16, the fp32 peak otherwise."""
        return (self.bf16_tflops if precision in ("bf16", "fp16") else self.fp32_tflops) * 1e12

    def as_dict(self) -> dict:
        return asdict(self)


ACCELERATORS = {a.name: a for a in [
    # AWS publishes no A10G datasheet; 70 dense bf16 TFLOPS is the figure used in NVIDIA/AWS-derived
    # A10 vs A10G comparisons (e.g. Baseten's), below the A10's own 125 (datasheet: 250 with sparsity).
    Accelerator("A10G", 24, 70.0, 31.2, "AWS G5 / A10 vs A10G comparisons (no vendor datasheet)"),
    # NVIDIA T4 datasheet: 16 GB; mixed-precision (FP16/FP32) tensor 65 TFLOPS, FP32 8.1; no bf16.
    Accelerator("T4", 16, 65.0, 8.1, "NVIDIA T4 datasheet (fp16 only: no bf16 tensor cores)"),
    # NVIDIA L4 datasheet: FP16/BF16 tensor 242 TFLOPS with sparsity -> 121 dense; FP32 30.3 TFLOPS.
    Accelerator("L4", 24, 121.0, 30.3, "NVIDIA L4 datasheet"),
    # NVIDIA Ada Lovelace architecture whitepaper (RTX 4090): FP16/BF16 tensor with FP32 accumulate
    # 165.2 dense (330.4 sparse; GeForce cards run FP32 accumulate at half the FP16-accumulate rate);
    # FP32 82.6 TFLOPS.
    Accelerator("RTX4090", 24, 165.2, 82.6, "NVIDIA Ada GPU architecture whitepaper"),
    # NVIDIA A100 datasheet: BF16/FP16 tensor 312 TFLOPS (624 sparse), FP32 19.5 TFLOPS.
    Accelerator("A100-40GB", 40, 312.0, 19.5, "NVIDIA A100 datasheet"),
    Accelerator("A100-80GB", 80, 312.0, 19.5, "NVIDIA A100 datasheet"),
    # NVIDIA H100 datasheet, SXM: BF16/FP16 tensor 1,979 TFLOPS with sparsity -> 989 dense; FP32 67.
    Accelerator("H100", 80, 989.0, 67.0, "NVIDIA H100 datasheet (SXM5)"),
    # NVIDIA H100 datasheet, PCIe: 1,513 sparse -> 756 dense; FP32 51.
    Accelerator("H100-PCIe", 80, 756.0, 51.0, "NVIDIA H100 datasheet (PCIe)"),
    # NVIDIA H200 datasheet (SXM): 141 GB HBM3e; BF16/FP16 1,979 sparse -> 989 dense; FP32 67.
    Accelerator("H200", 141, 989.0, 67.0, "NVIDIA H200 datasheet (SXM)"),
    # NVIDIA HGX B200 specifications, per GPU: 180 GB HBM3e; FP16/BF16 tensor 4.5 PFLOPS sparse ->
    # 2,250 dense; FP32 75 TFLOPS.
    Accelerator("B200", 180, 2250.0, 75.0, "NVIDIA HGX B200 specifications"),
    # AMD Instinct MI300X datasheet: 192 GB HBM3; FP16/BF16 matrix 1,307.4 TFLOPS dense (2,614.9
    # sparse); FP32 vector 163.4 TFLOPS.
    Accelerator("MI300X", 192, 1307.4, 163.4, "AMD Instinct MI300X datasheet"),
]}

ALIASES = {"A100": "A100-80GB", "A100-40": "A100-40GB", "A100-80": "A100-80GB", "4090": "RTX4090",
           "RTX-4090": "RTX4090", "H100-SXM": "H100", "H100-80GB": "H100", "A10": "A10G"}


def lookup(name: str) -> Accelerator:
    """An accelerator by name (case and '-'/'_'/' ' insensitive); an input error lists the known names."""
    def norm(s: str) -> str:
        return s.upper().replace("_", "-").replace(" ", "-")

    key = norm(name)
    by_norm = {norm(k): v for k, v in ACCELERATORS.items()} | {norm(k): ACCELERATORS[v] for k, v in ALIASES.items()}
    if key in by_norm:
        return by_norm[key]
    raise InputError(f"unknown GPU {name!r}; known: {', '.join(ACCELERATORS)} "
                     "(or give --gpu-memory GB --gpu-tflops T)", field="--gpu")


def custom(memory_gb: float, tflops: float, name: str = "custom") -> Accelerator:
    """A device given by its memory (GiB) and dense bf16 peak (TFLOPS); fp32 taken as 1/8 of it when unknown."""
    return Accelerator(name, memory_gb, tflops, tflops / 8, "given on the command line")


def resolve(gpu: str | None, memory_gb: float | None, tflops: float | None) -> Accelerator:
    """The device of a plan: --gpu NAME, overridden field by field by --gpu-memory / --gpu-tflops."""
    if gpu is None and (memory_gb is None or tflops is None):
        raise InputError("give --gpu NAME, or both --gpu-memory GB and --gpu-tflops T", field="--gpu")
    base = lookup(gpu) if gpu is not None else None
    if base is None:
        return custom(memory_gb, tflops)
    if memory_gb is None and tflops is None:
        return base
    return Accelerator(base.name, memory_gb if memory_gb is not None else base.memory_gb,
                       tflops if tflops is not None else base.bf16_tflops, base.fp32_tflops, base.source + " (overridden)")
