"""Selective activation checkpointing: recompute the RMSNorms in backward instead of keeping their insides.

Measured on SmolLM2-135M's architecture (benchmarks/perf_profile.py, 4 packed rows of 512 tokens,
bf16 autocast): of the ~75 MB a decoder layer keeps for backward, its two RMSNorms keep ~22 MB:
the fp32 input, its square, the reciprocal root and the normalised product, because transformers
writes RMSNorm as separate fp32 ops. Recomputing a norm costs a few elementwise passes over a
(tokens, hidden) tensor (well under 1% of a layer's FLOPs); kept, it is a third of the layer's
activation memory. Under checkpointing a norm keeps only its input (4.7 MB here), so ~18 MB per
layer go, ~0.5 GB for the 30 layers. The recomputation replays the same ops on the same input
under the same autocast state, so values and gradients are bit-identical (tests/test_recompute.py).

Applied per module instance (its `forward` attribute), so parameter names, state dicts and saved
models are unchanged; full gradient checkpointing (train.gradient_checkpointing) makes it moot.

The gated MLP's activation (`train.recompute_mlp_activation`, `recompute_gated_activations`):
`down_proj(act_fn(gate_proj(x)) * up_proj(x))` keeps gate, up and act(gate) for backward, three
(tokens, intermediate) tensors. Recomputing `act_fn(gate) * up` in backward from gate and up (which
stay saved) drops act(gate): on SmolLM2-135M at 4 x 512 tokens, 2032 x 1536 bf16 values a layer,
~187 MB over 30 layers, for one SiLU and one multiply over that tensor again (about 0.3% of a layer's
FLOPs). It replays the same ops on the same inputs under the same autocast state (no RNG: the
projections, with any LoRA dropout, run outside the recomputed part, in the original order), so
values and gradients are bit-identical (tests/test_recompute.py). Only MLPs whose forward is exactly
that expression (Llama and the families written from it: Mistral, Qwen2/3, Gemma, SmolLM) are changed.

Their outputs, made again for LoRA (`Recomputable`, `lora.recompute_inputs`): a recomputed norm's
output and the gated product are the inputs of the adapted projections after them (q/k/v, gate/up,
down), and an adapter's lora_A needs its input for its weight gradient, so it kept them: the norm's
fp32 output (2,032 x 576 x 4 bytes a norm, two a layer) and the bf16 product (2,032 x 1,536 x 2),
~15 MB a SmolLM2 layer at 4 x 512 tokens, ~447 MB over its 30 layers, when the tensors they are
made from (the norm's input, gate and up) are kept for backward anyway. Each such output carries
a `Recomputable` (attribute `tunelab_recompute`): the function, its inputs and the autocast state
it ran under. lean dropout's lora_A (models/lora_dropout.py) keeps that instead of the tensor and
makes the tensor again in its backward, once for all the projections that read it (q, k and v
share one), freeing it after the last. Same ops, same inputs, same autocast state: bit-identical
(tests/test_recompute.py). The cost: one norm (a few elementwise passes over 2,032 x 576) and one
SiLU and multiply over 2,032 x 1,536 a layer again, in backward.
"""

from __future__ import annotations

import inspect
import re

import torch
from torch.utils.checkpoint import checkpoint


def is_rms_norm(module: torch.nn.Module) -> bool:
    """transformers' RMSNorm classes (LlamaRMSNorm, Qwen2RMSNorm, ...): python-level elementwise ops."""
    return type(module).__name__.endswith("RMSNorm") and hasattr(module, "weight")


class Recomputable:
    """How to make a tensor again in backward: `fn(*args, **kwargs)` under the autocast state of its
    forward, without grad. Consumers `claim` it in their forward and `get` it in their backward; the
    value is made once, shared, and dropped (with the inputs) after the last consumer's get."""

    def __init__(self, fn, args: tuple, kwargs: dict, device_type: str):
        self.fn, self.args, self.kwargs, self.device_type = fn, args, kwargs, device_type
        self.autocast = (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        self.users, self._value = 0, None

    def claim(self) -> "Recomputable":
        self.users += 1
        return self

    def get(self) -> torch.Tensor:
        if self._value is None:
            if self.args is None:
                raise RuntimeError("a recomputed LoRA input was asked for after its last backward (backward "
                                   "through the same graph twice): set lora.recompute_inputs: false")
            enabled, dtype = self.autocast
            with torch.no_grad(), torch.autocast(self.device_type, dtype=dtype, enabled=enabled):
                self._value = self.fn(*self.args, **self.kwargs)
        value = self._value
        self.users -= 1
        if self.users <= 0:
            self._value = self.args = self.kwargs = None
        return value


def mark_recomputable(out: torch.Tensor, fn, *args, **kwargs) -> torch.Tensor:
    """Attach to `out` how to make it again from inputs autograd keeps anyway (see the module docstring)."""
    out.tunelab_recompute = Recomputable(fn, args, kwargs, out.device.type)
    return out


def _kept_in_backward(module: torch.nn.Module) -> bool:
    """Whether the module's weights are whole when backward reaches its consumers: not under ZeRO-3,
    whose partitioned parameters (`ds_id`) are gathered only when backward reaches the module itself."""
    return not any(hasattr(p, "ds_id") for p in module.parameters())


def _recomputed(forward):
    def run(hidden_states, *args, **kwargs):
        if torch.is_grad_enabled() and (hidden_states.requires_grad or any(p.requires_grad for p in forward.__self__.parameters())):
            out = checkpoint(forward, hidden_states, *args, use_reentrant=False, **kwargs)
            if isinstance(out, torch.Tensor) and _kept_in_backward(forward.__self__):
                mark_recomputable(out, forward, hidden_states, *args, **kwargs)
            return out
        return forward(hidden_states, *args, **kwargs)

    run.tunelab_recomputed = True
    return run


def recompute_norms(model: torch.nn.Module) -> int:
    """Make every RMSNorm of `model` recompute in backward; returns how many (0: none found, or done already)."""
    n = 0
    for module in model.modules():
        if is_rms_norm(module) and not getattr(module.forward, "tunelab_recomputed", False):
            module.forward = _recomputed(module.forward)
            n += 1
    return n


_GATED = re.compile(r"self\.down_proj\(self\.act_fn\(self\.gate_proj\((\w+)\)\)\*self\.up_proj\(\1\)\)")
_gated_classes: dict[type, bool] = {}


def is_gated_mlp(module: torch.nn.Module) -> bool:
    """Whether the module's forward is Llama's gated MLP expression (checked once per class, in its source)."""
    cls = type(module)
    if cls not in _gated_classes:
        try:
            src = "".join(inspect.getsource(cls.forward).split())
        except (OSError, TypeError):
            src = ""
        _gated_classes[cls] = all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")) \
            and bool(_GATED.search(src))
    return _gated_classes[cls]


def _act_times_up(act_fn, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return act_fn(gate) * up


def _gated_forward(mlp):
    def forward(x):
        gate = mlp.gate_proj(x)  # the projections in the original order (LoRA dropout draws the same masks)
        up = mlp.up_proj(x)
        if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
            hidden = checkpoint(_act_times_up, mlp.act_fn, gate, up, use_reentrant=False, preserve_rng_state=False)
            mark_recomputable(hidden, _act_times_up, mlp.act_fn, gate, up)
        else:
            hidden = _act_times_up(mlp.act_fn, gate, up)
        return mlp.down_proj(hidden)

    forward.tunelab_recomputed = True
    return forward


def recompute_gated_activations(model: torch.nn.Module) -> int:
    """Make every gated MLP of `model` recompute act(gate) * up in backward; returns how many were changed."""
    n = 0
    for module in model.modules():
        if not getattr(module.forward, "tunelab_recomputed", False) and is_gated_mlp(module):
            module.forward = _gated_forward(module)
            n += 1
    return n


__all__ = ["Recomputable", "is_gated_mlp", "mark_recomputable", "is_rms_norm", "recompute_gated_activations", "recompute_norms"]
