"""QLoRA's quantised base: NF4 at load time, the compute dtype, and keeping 4-bit layers trainable.

What the model loaders need to load a base in 4 bits (models.load takes the config this module
builds) and what the adapters need to train on it; nothing here knows about adapters.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from tunelab.device import cpu_has_bf16, run_device

# heads that are created (or resized) by tunelab and must stay in full precision under QLoRA
QLORA_SKIP_MODULES = ["classifier", "score", "lm_head"]


def quiet_bitsandbytes() -> None:
    """bitsandbytes warns on import that an optional download-only CPU kernel is missing; its own
    CPU fallback works (measured), so the warning only alarms users."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def compute_dtype(device: torch.device | None = None) -> torch.dtype:
    """bf16 where the hardware computes it natively (CUDA with bf16, CPUs with AVX512-BF16/AMX), else fp32."""
    device = device or run_device()
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


def nf4_config(skip_modules: list[str] | None = None, storage: torch.dtype = torch.uint8):
    """4-bit NF4 with double quantisation (QLoRA, Dettmers et al. 2023); heads stay unquantised.

    `storage`: the dtype the packed 4-bit values are kept in. bfloat16 under FSDP (the FSDP-QLoRA
    recipe): FSDP2 shards, all-gathers and reduces floating-point tensors, and bitsandbytes' Linear4bit
    restores each gathered weight's quantisation state from its module (measured on CPU with
    bitsandbytes 0.50.2: 2 fsdp processes give one process's LoRA weights within 3e-8)."""
    quiet_bitsandbytes()
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype(),
        bnb_4bit_quant_storage=storage,
        llm_int8_skip_modules=list(skip_modules or QLORA_SKIP_MODULES),
    )


def quantization_for(method: str, strategy: str | None = None):
    """The `quantization` argument of the model loaders for `method`: NF4 for qlora, else None
    (packed in bfloat16 under distributed.strategy fsdp, which shards the 4-bit base: see nf4_config)."""
    if method != "qlora":
        return None
    return nf4_config(storage=torch.bfloat16 if strategy == "fsdp" else torch.uint8)


def keep_4bit_trainable(model: nn.Module) -> int:
    """Switch off bitsandbytes' CPU inference repack of 4-bit weights; returns the layers touched.

    In eval mode without grad, bitsandbytes (0.50, AVX512-BF16 CPUs) repacks each 4-bit weight in
    place into a layout only its inference kernel reads: the next training forward then fails,
    and the repack also fails outright for inputs narrower than the quantisation block (64).
    Evaluation between training steps must leave the weights as training needs them.
    """
    n = 0
    for m in model.modules():
        if getattr(m, "support_avx512bf16_for_cpu", False):
            m.support_avx512bf16_for_cpu = False
            n += 1
    return n


def real_numel(p: torch.Tensor) -> int:
    """Parameters a tensor stands for: a packed 4-bit weight counts its unpacked shape."""
    shape = getattr(getattr(p, "quant_state", None), "shape", None)
    return int(torch.Size(shape).numel()) if shape is not None else p.numel()
