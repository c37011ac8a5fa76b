"""LoRA's input dropout without its saved copies (`lora.lean_dropout`, default on).

Why tunelab replaces this part of peft: peft computes `lora_B(lora_A(dropout(x)))`. On the CPU,
torch's dropout is `x * noise` with an fp32 noise tensor (0 or 1/(1-p)) that the multiplication
saves for backward, and under bf16 autocast lora_A saves its own bf16 copy of the dropped input:
6 bytes per input value, for every adapted projection of every layer. On SmolLM2-135M with LoRA on
q,k,v,o,gate,up,down at 4 x 512 tokens that is 1,147 MB of noise plus ~600 MB of copies, more
than all the other activations of the step (benchmarks/perf_profile.py --method lora --part saved).

Here dropout and lora_A are one autograd function that saves the input as it reached the layer
(the attention output and the MLP product are bf16 tensors the base layer keeps anyway; a norm's
fp32 output is kept once for q, k and v) and the dropout mask bit-packed (1 bit a value, `pack_mask`),
and rebuilds the mask, the noise and the dropped input in backward. The numbers are peft's
own: the mask is drawn exactly as torch's dropout draws it (`bernoulli_(1 - p)` on a tensor like the
input, then `div_(1 - p)`), so the same seed gives the same mask, the same output and the same
gradients (tests/test_lora_dropout.py compares with peft's layer). Vanilla LoRA only: DoRA's
forward uses the dropped input elsewhere too and keeps peft's dropout.

Why bit-packed (issue 14): kept as torch.bool (1 byte a value) the masks were 307 MB (293 MiB) of
that SmolLM2 step's saved activations (30 layers x 4 x 512 tokens x (6 x 576 + 1,536) inputs = 307M
values); packed they are 38 MB, 268 MB less. The cost, measured on the 2-core CPU (torch 2.13, masks
of 2,032 x 576 and 2,048 x 1,536 values, best of 150 calls): packing 0.08-0.09 ms per 1M values (the
bytes of 8 bools read as one int64, times a magic constant, whose top byte is then the 8 bits;
summing a (-1, 8) view times the bit weights took 0.75 ms per 1M), unpacking 0.13-0.14 ms per 1M
(the packed bytes pick rows of a 256-row table of 8 bytes, `index_select` on its int64 view; the
multiply-and-mask form took ~0.18 ms, a (n, 8) row gather 0.7 ms): ~0.22 ms per 1M, ~70 ms for the
step's 307M values; one 2,048 x 576 projection's forward + backward under bf16 autocast (~11-12 ms)
takes ~0.3-0.7 ms more. Drawing the mask (`bernoulli_`) costs ~5 ms per 1M.
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from torch import nn


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype lora_A's linear runs in: autocast's where it is on, else the weight's (peft casts the
    input to lora_A's dtype)."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else weight.dtype


# The bytes of eight 0/1 bools read as one int64, times this constant, put bool j at bit 56 + j
# (no carries: every other product lands on its own lower bit, or past bit 63 and is dropped); the
# top byte is then the eight bools, the first in its lowest bit (numpy's bitorder="little"). Memory
# byte j is bit 8j of the int64 on a little-endian machine, 8(7 - j) on a big-endian one.
_PACK_MAGIC = {"little": 0x0102040810204080, "big": 0x8040201008040201 - (1 << 64)}
# Row b: the eight bools of packed byte b, lowest bit first, as one int64 (endian-free: bytes in, bytes out).
_UNPACK_ROWS = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).to(torch.uint8).view(torch.int64).reshape(256)
_unpack_rows: dict[torch.device, torch.Tensor] = {}


def _pack_words(words: torch.Tensor, magic: int) -> torch.Tensor:
    """One byte per int64 of eight 0/1 bytes (the top byte of the product; the cast keeps the low byte)."""
    return words.mul(magic).bitwise_right_shift_(56).to(torch.uint8)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor's values (in its logical order, any shape or strides) as bits: a uint8 tensor of
    ceil(numel / 8) bytes, value i at bit i % 8 of byte i // 8 (numpy.packbits(..., bitorder="little"))."""
    flat = mask.reshape(-1).view(torch.uint8)
    pad = -flat.numel() % 8
    if pad or flat.storage_offset() % 8:  # whole int64 words, from an 8-byte aligned start
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return _pack_words(flat.view(torch.int64), _PACK_MAGIC[sys.byteorder])


def unpack_mask(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """`pack_mask`'s inverse: a contiguous bool tensor of `shape`."""
    rows = _unpack_rows.get(packed.device)
    if rows is None:
        rows = _unpack_rows[packed.device] = _UNPACK_ROWS.to(packed.device)
    return rows.index_select(0, packed.long()).view(torch.uint8)[:math.prod(shape)].view(torch.bool).view(shape)


class _DroppedLinear(torch.autograd.Function):
    """dropout(x.to(weight.dtype), p) @ weight.T, peft's order of casts, saving x as it came and the
    mask's bits instead of the noise and the dropped copy."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, p: float, again=None):
        wdt, cdt = weight.dtype, _compute_dtype(x, weight)
        xw = x.to(wdt)  # peft's _cast_input_dtype (switched off on folded layers: done here, not kept)
        noise = torch.empty_like(xw).bernoulli_(1 - p)  # as torch's CPU dropout draws it
        packed = pack_mask(noise.bool())
        noise.div_(1 - p)
        with torch.autocast(x.device.type, enabled=False):
            out = F.linear((xw * noise).to(cdt), weight.to(cdt))
        # `again` (models.recompute.Recomputable): x is made again in backward instead of kept
        ctx.again = again.claim() if again is not None else None
        ctx.save_for_backward(*(() if again is not None else (x,)), packed, weight)
        ctx.p, ctx.cdt, ctx.shape, ctx.xdt = p, cdt, noise.shape, x.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        *kept, packed, weight = ctx.saved_tensors
        again, ctx.again = ctx.again, None  # its inputs go with the last consumer's backward
        wdt, cdt = weight.dtype, ctx.cdt
        noise = unpack_mask(packed, ctx.shape).to(wdt).div_(1 - ctx.p)
        grad_out = grad_out.to(cdt)
        grad_x = grad_w = None
        if ctx.needs_input_grad[1]:
            x = kept[0] if kept else again.get()
            dropped = (x.to(wdt) * noise).to(cdt)
            grad_w = (grad_out.reshape(-1, grad_out.shape[-1]).t() @ dropped.reshape(-1, dropped.shape[-1])).to(wdt)
        if ctx.needs_input_grad[0]:
            grad_x = ((grad_out @ weight.to(cdt)).to(wdt) * noise).to(ctx.xdt)
        return grad_x, grad_w, None, None


class DroppedInputLinear(nn.Linear):
    """peft's lora_A with the adapter's dropout folded in (training mode only; eval is the plain linear)."""

    def __init__(self, linear: nn.Linear, p: float, recompute_inputs: bool = True):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # the same Parameter: state-dict keys and the optimizer see no change
        self.register_parameter("bias", None)
        self.p = float(p)
        self.recompute_inputs = bool(recompute_inputs)  # lora.recompute_inputs (models/recompute.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:  # peft's dropout is off exactly then too
            return super().forward(x.to(self.weight.dtype))
        again = getattr(x, "tunelab_recompute", None) if self.recompute_inputs else None
        return _DroppedLinear.apply(x, self.weight, self.p, again)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", dropout={self.p} (lean)"


def lean_lora_dropout(model: nn.Module, recompute_inputs: bool = True) -> int:
    """Fold each vanilla LoRA adapter's dropout into its lora_A (in place); how many were folded.
    `recompute_inputs` (lora.recompute_inputs): an input that says how to make it again
    (models.recompute.Recomputable: a recomputed norm's output, the gated product) is made again in
    backward instead of kept."""
    from peft.tuners.lora import LoraLayer

    folded = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for name, dropout in list(module.lora_dropout.items()):
            if not isinstance(dropout, nn.Dropout) or dropout.p == 0.0 or name in getattr(module, "lora_variant", {}):
                continue
            a = module.lora_A[name] if name in module.lora_A else None
            if type(a) is not nn.Linear or a.bias is not None:
                continue
            module.lora_A[name] = DroppedInputLinear(a, dropout.p, recompute_inputs)
            module.lora_dropout[name] = nn.Identity()
            folded += 1
        if module.lora_A and all(isinstance(a, DroppedInputLinear) for a in module.lora_A.values()):
            # the input reaches lora_A as it came (a bf16 hidden state stays the tensor the base layer
            # keeps); DroppedInputLinear casts it to its dtype itself, as peft's cast did
            module.cast_input_dtype_enabled = False
    return folded


__all__ = ["DroppedInputLinear", "lean_lora_dropout"]
