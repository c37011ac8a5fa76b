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
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def is_rms_norm(module: torch.nn.Module) -> bool:
    """transformers' RMSNorm classes (LlamaRMSNorm, Qwen2RMSNorm, ...): python-level elementwise ops."""
    return type(module).__name__.endswith("RMSNorm") and hasattr(module, "weight")


def _recomputed(forward):
    def run(hidden_states, *args, **kwargs):
        if torch.is_grad_enabled() and (hidden_states.requires_grad or any(p.requires_grad for p in forward.__self__.parameters())):
            return checkpoint(forward, hidden_states, *args, use_reentrant=False, **kwargs)
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


__all__ = ["is_rms_norm", "recompute_norms"]
