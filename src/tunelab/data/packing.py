"""Packing several examples into one row without letting them see each other, and padding.

Per-example `position_ids` alone do NOT isolate packed examples in transformers 5.23 with `sdpa`
or `eager` attention (measured on SmolLM2: logits off by up to 19.5, see DESIGN.md): every token
still attends to the earlier examples of its row. So a packed row carries a 4-D block-diagonal
causal mask (1, 1, L, L) in the additive float form (0 = may attend, -inf = may not), which both
`sdpa` and `eager` accept as is, plus positions that restart at 0 for each example. Labels need
no change: each example's first label is -100, so no token is trained to predict the next
example's first token.
"""

from __future__ import annotations

import torch

from tunelab.data.chat_template import IGNORE_INDEX


def pack(lengths: list[int], max_length: int) -> list[list[int]]:
    """Bins of example indices, first-fit decreasing; each bin's total length is <= max_length.

    Deterministic: ties keep the original order. Raises ValueError for an example longer than
    max_length (encode with the same max_length first).
    """
    too_long = [i for i, n in enumerate(lengths) if n > max_length]
    if too_long:
        raise ValueError(f"example {too_long[0]} has {lengths[too_long[0]]} tokens > max_length {max_length}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(max_length - lengths[i])
    return bins


def block_causal_mask(lengths: list[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(1, 1, L, L) additive mask: causal inside each segment, -inf across segments."""
    total = sum(lengths)
    segment = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    same = segment[:, None] == segment[None, :]
    causal = torch.ones(total, total, dtype=torch.bool).tril()
    mask = torch.full((total, total), float("-inf"), dtype=dtype)
    mask.masked_fill_(same & causal, 0.0)
    return mask[None, None]


def collate_packed(examples, bins_indices: list[int], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """One packed row from the examples at `bins_indices`.

    Returns input_ids, labels, position_ids (each (1, L)) and attention_mask (1, 1, L, L) float
    0/-inf in `dtype` (pass the model's compute dtype when it runs in bf16/fp16).
    """
    chosen = [examples[i] for i in bins_indices]
    lengths = [len(e.input_ids) for e in chosen]
    input_ids = [t for e in chosen for t in e.input_ids]
    labels = []
    for e in chosen:
        labels += [IGNORE_INDEX] + list(e.labels[1:])  # guard: a segment's first token is never a target
    positions = [p for n in lengths for p in range(n)]
    return {
        "input_ids": torch.tensor([input_ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        "attention_mask": block_causal_mask(lengths, dtype),
    }


def collate_padded(examples, indices: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids (pad_id), labels (-100 on padding), attention_mask (B, L) 0/1."""
    chosen = [examples[i] for i in indices]
    width = max(len(e.input_ids) for e in chosen)
    ids, labels, mask = [], [], []
    for e in chosen:
        pad = width - len(e.input_ids)
        ids.append(list(e.input_ids) + [pad_id] * pad)
        labels.append(list(e.labels) + [IGNORE_INDEX] * pad)
        mask.append([1] * len(e.input_ids) + [0] * pad)
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "attention_mask": torch.tensor(mask, dtype=torch.long),
    }


def stack_rows(rows: list[dict], pad_id: int) -> dict:
    """Stack packed rows (each batch 1, its own (1,1,L,L) mask) into one batch padded to the widest.

    Padding positions attend to themselves only (a fully masked row would give NaN in attention,
    and NaN times a zero gradient is still NaN) and carry no labels.
    """
    if len(rows) == 1:
        return rows[0]
    width = max(r["input_ids"].shape[1] for r in rows)
    out = {"input_ids": [], "labels": [], "position_ids": [], "attention_mask": []}
    for r in rows:
        n, pad = r["input_ids"].shape[1], width - r["input_ids"].shape[1]
        out["input_ids"].append(torch.nn.functional.pad(r["input_ids"], (0, pad), value=pad_id))
        out["labels"].append(torch.nn.functional.pad(r["labels"], (0, pad), value=IGNORE_INDEX))
        out["position_ids"].append(torch.nn.functional.pad(r["position_ids"], (0, pad), value=0))
        mask = torch.full((1, 1, width, width), float("-inf"), dtype=r["attention_mask"].dtype)
        mask[..., :n, :n] = r["attention_mask"]
        idx = torch.arange(n, width)
        mask[..., idx, idx] = 0.0
        out["attention_mask"].append(mask)
    return {k: torch.cat(v) for k, v in out.items()} | {"num_tokens": sum(r["input_ids"].shape[1] for r in rows)}
