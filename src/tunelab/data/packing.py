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

import numpy as np
import torch

from tunelab.data.chat_template import IGNORE_INDEX


def pack(lengths, max_length: int) -> list[list[int]]:
    """Bins of example indices, first-fit decreasing; each bin's total length is <= max_length.

    Deterministic: ties keep the original order. Raises ValueError for an example longer than
    max_length (encode with the same max_length first).

    First-fit in O(n log n): the bins' free room sits in a max segment tree, so "the first bin with
    room for x" is one walk down it (the left child whenever it has the room) and a placement one
    walk up (stopping where a maximum does not change). A run of equal lengths is placed in bulk:
    the bin first-fit picks for one of them stays the first fit for the next until it is too full,
    so it takes room // x of them at once. The bins are those of the plain quadratic scan (each
    example to the lowest-numbered bin with room, else a new bin), identical, tested against it.
    """
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    too_long = np.flatnonzero(lengths > max_length)
    if too_long.size:
        i = int(too_long[0])
        raise ValueError(f"example {i} has {int(lengths[i])} tokens > max_length {max_length}")
    n = len(lengths)
    if not n:
        return []
    order = np.argsort(-lengths, kind="stable")  # decreasing, ties in their original order
    ordered = lengths[order]
    starts = np.concatenate([[0], np.flatnonzero(np.diff(ordered)) + 1, [n]]).tolist()
    order = order.tolist()
    size = 1 << max(0, (n - 1).bit_length())  # leaves: one per possible bin (never more bins than examples)
    room = [0] * (2 * size)  # room[size + b]: bin b's free tokens; room[i]: the most of its subtree
    bins: list[list[int]] = []

    def set_room(leaf: int, value: int) -> None:
        room[leaf] = value
        leaf >>= 1
        while leaf:
            best = max(room[2 * leaf], room[2 * leaf + 1])
            if room[leaf] == best:
                return
            room[leaf] = best
            leaf >>= 1

    for a, b in zip(starts, starts[1:]):
        x, items, pos = int(ordered[a]), order[a:b], 0
        if x == 0:  # room >= 0 everywhere: all of them into the first bin
            if bins:
                bins[0].extend(items)
            else:
                bins.append(list(items))
                set_room(size, max_length)
            continue
        while pos < len(items):
            if room[1] >= x:
                leaf = 1
                while leaf < size:
                    leaf <<= 1
                    if room[leaf] < x:
                        leaf += 1
                take = min(len(items) - pos, room[leaf] // x)
                bins[leaf - size].extend(items[pos : pos + take])
                set_room(leaf, room[leaf] - take * x)
            else:
                take = min(len(items) - pos, max_length // x)
                bins.append(items[pos : pos + take])
                set_room(size + len(bins) - 1, max_length - take * x)
            pos += take
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
