"""Where tensors live: the run's device, and moving batches there.

Collate functions build batches on the CPU (tokenizers and padding are CPU work); the model may be
on a GPU. The loop's batches are moved by a collate wrapper set up in `tunelab.run`; evaluation,
the Fisher estimate and feature caching move theirs with `to_device` next to the model call.
"""

from __future__ import annotations

import torch


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch with its tensors on `device` (collate functions build on the CPU; a no-op there)."""
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def run_device() -> torch.device:
    """Where a run trains: the GPU when torch sees one (one per process under DDP), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 / AMX, as oneDNN reports it). Without it
    bf16 matmuls are emulated: measured on an AVX2-only AMD EPYC, 0.1-0.2 GFLOP/s against ~10 in fp32.
    One definition for `precision: auto` (train/precision.py) and QLoRA's compute dtype (models/quantization.py)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
