"""Mixed precision: which autocast context a run uses, and where the weights are kept.

By default weights and optimizer state stay fp32 (master weights); only the forward runs in bf16
under autocast. `train.weights_dtype: bf16` stores the floating-point parameters themselves in bf16
(`store_weights_bf16`; AdamWBf16 in train/bf16_adamw.py updates them with stochastic rounding). `auto` picks bf16 on a CUDA device that supports it, and on CPU only for models large
enough to profit (measured: ~2x faster from 5M parameters up, no clear gain on toy models).
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import partial

import torch

from tunelab.device import cpu_has_bf16

# benchmarks/results/precision_cpu.json (this CPU: AVX512-BF16, no AMX): bf16 autocast took 0.50x the
# fp32 step time for MiniLM (22.7M) and 0.39x for SmolLM2-135M, 0.51x at 5.5M, ~0.9x (noise) at 0.66M.
CPU_BF16_MIN_PARAMS = 5_000_000


def resolve_precision(precision: str, device: torch.device, n_params: int, weights_dtype: str = "fp32") -> str:
    if weights_dtype == "bf16":  # bf16 weights compute in bf16 (config refuses fp32 / fp16 with them)
        return "bf16"
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if n_params >= CPU_BF16_MIN_PARAMS and cpu_has_bf16() else "fp32"


def autocast_factory(precision: str, device: torch.device):
    """A zero-argument callable returning the context to run forwards in."""
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return partial(torch.autocast, device_type=device.type, dtype=dtype)
    return nullcontext


def grad_scaler(precision: str, device: torch.device):
    """fp16 needs dynamic loss scaling (bf16 has fp32's range and does not)."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type)


def store_weights_bf16(model: torch.nn.Module) -> int:
    """Cast every floating-point parameter to bf16 in place; returns how many values were cast.

    Buffers stay as they are: a rotary embedding's inv_freq or a norm's running statistics in bf16
    would change the positions and statistics the model computes, not just its storage."""
    cast = 0
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != torch.bfloat16:
            p.data = p.data.to(torch.bfloat16)
            cast += p.numel()
    return cast
