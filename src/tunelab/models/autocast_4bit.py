"""QLoRA's 4-bit base layers keep autocast's output dtype (`lora.base_dtype`, default auto).

Under bf16 autocast an `nn.Linear` returns bf16: that is what autocast is for, and what a LoRA base
(or a frozen one stored in bf16, models/frozen_weights.py) gives the next op. bitsandbytes'
`Linear4bit` is not autocast-aware: it casts its input to its compute dtype (bf16), multiplies in
bf16, and then casts the product *back to the input's dtype*. The input of q/k/v and gate/up is the
RMSNorm's fp32 output, so under QLoRA those projections hand fp32 tensors to everything after them:
peft's adapter sum, RoPE, the gated MLP's activation and product, each of which then saves fp32
activations for backward, twice LoRA's bytes (SmolLM2-135M at 4 x 512 tokens: QLoRA's peak was
above LoRA's despite a 4-bit base). The upcast adds no information: the values are bf16 products.

`Linear4bitAutocast` hands its input to bitsandbytes already in the compute dtype when autocast runs
in that dtype, so the output stays bf16, exactly as autocast's `F.linear` of the dequantised weight
would be. The numbers downstream are then those of LoRA on a bf16 base holding the dequantised NF4
values: tests/test_autocast_4bit.py compares a QLoRA model with this class against such a LoRA model
(bit-identical loss and adapter gradients). Outside autocast (or autocast in another dtype) the layer
is bitsandbytes' own. We subclass rather than copy bitsandbytes' forward so its quantisation-state
handling (FSDP gathers, CPU repacking) stays in one place.
"""

from __future__ import annotations

import torch
from bitsandbytes.nn import Linear4bit
from torch import nn


class Linear4bitAutocast(Linear4bit):
    """bitsandbytes' Linear4bit whose output keeps autocast's dtype (bf16) instead of the input's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dev = x.device.type
        if torch.is_autocast_enabled(dev) and self.compute_dtype == torch.get_autocast_dtype(dev):
            x = x.to(self.compute_dtype)  # bitsandbytes casts its product back to this dtype
        return super().forward(x)


def keep_autocast_dtype(model: nn.Module) -> int:
    """Make every bitsandbytes Linear4bit of `model` a Linear4bitAutocast; returns the layers changed."""
    n = 0
    for m in model.modules():
        if type(m) is Linear4bit:
            m.__class__ = Linear4bitAutocast
            n += 1
    return n


__all__ = ["Linear4bitAutocast", "keep_autocast_dtype"]
