"""Frozen Linear weights stored in bf16 under bf16 autocast (`lora.base_dtype`, default auto).

Under bf16 autocast every `F.linear` casts its fp32 weight to bf16 on each call. For a frozen weight
(a LoRA base, requires_grad False) autocast does not cache that cast, so each forward writes a fresh
bf16 copy of every frozen projection, and autograd keeps it for the input gradient until backward:
on SmolLM2-135M LoRA that is 212 MB of bf16 copies held per step, on top of the 424 MB of fp32
weights they are cast from. Storing the frozen weight in bf16 once removes both: the weight is 2 bytes
a value and the matmul reads it as it is.

The numbers do not change. autocast's cast is `weight.to(bfloat16)` (round to nearest even), the
same rounding as storing it; so inside bf16 autocast the forward and every gradient are bit-identical
to the fp32-weight path (tests/test_frozen_weights.py). A forward outside bf16 autocast (the forgetting
probe, generation measures, an fp16 context) computes with `weight.to(float32)`: the bf16-rounded
weight, exactly the loaded one where the checkpoint holds bf16 values (Llama, Qwen, Mistral and SmolLM2
ship bf16; the embedded SmolLM2 is a Q4_1 GGUF, whose dequantised values in general are not). The run
stores the weights before its first measurement, so every before/after comparison sees the same weights.

Peft's `merged/` and `tunelab export` reload the base from disk, so the stored dtype never reaches
a saved model. Tied weights (an lm_head shared with the embedding) and anything not a plain
`nn.Linear` (bitsandbytes' 4-bit layers, peft's adapters) are left as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FrozenBf16Linear(nn.Linear):
    """nn.Linear whose frozen weight is stored in bf16: used as it is under bf16 autocast (what
    autocast would have cast it to), upcast to fp32 for the call anywhere else."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dev = x.device.type
        if torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) == torch.bfloat16:
            return F.linear(x, self.weight, self.bias)
        return F.linear(x, self.weight.to(torch.float32), self.bias)


def stores(method: str, lora, *, precision: str, weights_dtype: str, strategy: str, unfreezes: bool) -> bool:
    """Whether `lora.base_dtype` (auto or bf16; `lora` the config's lora section) stores the frozen weights
    in this run: under bf16 autocast over fp32 weights, method lora or qlora without DoRA, strategy ddp,
    nothing unfrozen later (auto steps aside otherwise; config.py refuses an explicit bf16)."""
    if method not in ("lora", "qlora") or lora.base_dtype == "fp32" or precision != "bf16":
        return False
    return not (weights_dtype == "bf16" or lora.dora or strategy != "ddp" or unfreezes)


def store_frozen_linears_bf16(model: nn.Module) -> tuple[int, int]:
    """Store the fp32 weight of every frozen, untied plain nn.Linear in bf16 (FrozenBf16Linear).
    Returns (layers stored, values stored)."""
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    layers = values = 0
    for m in model.modules():
        w = getattr(m, "weight", None)
        if type(m) is not nn.Linear or w is None or w.requires_grad or w.dtype != torch.float32:
            continue
        if uses.get(id(w), 0) > 1:
            continue
        m.weight = nn.Parameter(w.detach().to(torch.bfloat16), requires_grad=False)
        m.__class__ = FrozenBf16Linear
        layers, values = layers + 1, values + w.numel()
    return layers, values


__all__ = ["FrozenBf16Linear", "store_frozen_linears_bf16", "stores"]
