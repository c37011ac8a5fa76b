"""Attention for packed rows without an L x L mask: each packed example gets its own causal sdpa call.

A packed row holds several examples; they must not see each other. The exact path
(data.packing.block_causal_mask) hands the model a (B, 1, L, L) block-diagonal mask: its size grows
with the square of the row length, and the kernel is asked to attend over the whole row.

Here the row's examples are found from `position_ids` (they restart at 0 for each example, and a
padding token is its own one-token example, as in the exact path) and attention runs on each
example's slice with `is_causal=True`. No mask is built, the attention FLOPs are those of the
examples alone, and the result is the exact path's up to float rounding
(tests/test_packed_attention.py compares logits and gradients with the masked path).

Measured (fp32, this AVX2-only CPU, torch 2.13, 4 rows x 512 tokens, 9 heads / 3 KV heads, one
layer's forward + backward): the masked call ~460-760 ms, this route ~720 ms, a plain causal call
over whole rows ~540 ms. torch's CPU flash kernel takes the (B, 1, L, L) mask block by block, so
the exact path neither materialises scores per head nor pays much for the masked blocks; the mask
itself is 4 MB per row. Here the route saves ~3 MB of saved activations per layer and costs time,
so train.packed_attention defaults to `mask`; `split` is for long rows, where the L x L mask grows
quadratically (1 GB per row at 16k tokens in fp32) and the per-example calls skip most of the work.

It plugs into transformers through its registries (`AttentionInterface`, `AttentionMaskInterface`)
under the name `tunelab_packed`; anything this route does not cover (a padding mask, a KV cache
during generation, queries shorter than keys) goes to transformers' own sdpa function unchanged.
"""

from __future__ import annotations

import torch

NAME = "tunelab_packed"


def segments(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, the (start, end) of each example: a new example starts wherever the position is 0."""
    rows = []
    starts_all = (position_ids == 0).tolist()  # one host read per forward layer; cheap next to the matmuls
    length = position_ids.shape[-1]
    for starts in starts_all:
        idx = [i for i, s in enumerate(starts) if s]
        if not idx or idx[0] != 0:
            idx = [0] + idx
        rows.append(list(zip(idx, idx[1:] + [length])))
    return rows


def _row_attention(q, k, v, spans, scaling):
    """(1, H, L, D) query of one row -> (1, L, H, D), causal attention within each span."""
    parts = []
    for s, e in spans:
        if e - s == 1:  # one token attends to itself only: its output is its value
            out = v[:, :, s:e]
        else:
            out = torch.nn.functional.scaled_dot_product_attention(
                q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True, scale=scaling)
        parts.append(out)
    return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)).transpose(1, 2)


def packed_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs):
    """transformers' attention-function signature: (attn_output (B, L, H, D), None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    if attention_mask is not None or query.shape[2] != key.shape[2] or dropout > 0.0 or query.shape[2] == 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if query.shape[1] != key.shape[1]:  # grouped KV heads repeated once: sdpa's enable_gqa was 1.7x slower here
        from transformers.integrations.sdpa_attention import repeat_kv

        key, value = repeat_kv(key, query.shape[1] // key.shape[1]), repeat_kv(value, query.shape[1] // value.shape[1])
    if position_ids is None:
        spans = [[(0, query.shape[2])]] * query.shape[0]
    else:
        spans = segments(position_ids.expand(query.shape[0], -1))
    rows = [_row_attention(query[b : b + 1], key[b : b + 1], value[b : b + 1], spans[b], scaling)
            for b in range(query.shape[0])]
    return (rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)), None


def packed_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                attention_mask: torch.Tensor | None = None, **kwargs):
    """No mask where the attention function splits the rows itself (no padding mask, no cache
    offset); otherwise the mask transformers' sdpa would get."""
    from transformers.masking_utils import sdpa_mask

    plain = attention_mask is None and q_length == kv_length and not _nonzero(q_offset) and not _nonzero(kv_offset)
    if plain:
        return None
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, attention_mask=attention_mask, **kwargs)


def _nonzero(x) -> bool:
    return bool(x.item() if isinstance(x, torch.Tensor) else x)


def register() -> None:
    """Make `tunelab_packed` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, packed_attention_forward)
    AttentionMaskInterface.register(NAME, packed_mask)


def supports(model) -> bool:
    """Whether the model's attention goes through transformers' attention registry as sdpa does
    (then `tunelab_packed` can stand in for it)."""
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) == "sdpa" and getattr(model, "_supports_sdpa", False)


def use_packed_attention(model) -> bool:
    """Switch a model from sdpa to `tunelab_packed`; False (and nothing changed) when it does not use sdpa."""
    if not supports(model):
        return False
    register()
    model.set_attn_implementation(NAME)
    return True


__all__ = ["NAME", "packed_attention_forward", "packed_mask", "register", "segments", "supports",
           "use_packed_attention"]
