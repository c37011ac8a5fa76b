"""Weighted mixing of several training sources: which rows of which source take part in each epoch.

An epoch is one pass over the FIRST source (the domain data); every other source i contributes
k_i = round(n_1 * w_i / w_1) rows, so the sources make up w_i / sum(w) of each epoch. Two ways to
draw (data.mix_sampling):

- `without_replacement` (default): source i's rows are taken in a fixed shuffled order of the
  source, each epoch continuing where the last one stopped and wrapping around at its end: a row is
  drawn again only after every row of its source has been (a source smaller than its share repeats
  in full passes; a larger one is seen in full across epochs), and an epoch never holds a row twice
  unless its source is smaller than its share. Every epoch holds exactly k_i rows of source i.
- `with_replacement`: each of the epoch's rows picks its source at random by weight, then a row
  of that source uniformly: the counts vary around the shares (multinomial sampling error).

Both are pure functions of (seed, epoch), so the loop's resume (epoch, batches done) lands on the
same batches as the uninterrupted run. `regularization.replay_data` with `replay_ratio` r is the
two-source case [train weight 1 - r, replay weight r] (data.batching.replay_schedule).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

SAMPLING = ("without_replacement", "with_replacement")


def per_epoch_counts(sizes: list[int], weights: list[float]) -> list[int]:
    """Rows of each source in one epoch: all of the first, the others in proportion to their weights."""
    n1, w1 = sizes[0], weights[0]
    return [n1] + [round(n1 * w / w1) if n else 0 for n, w in zip(sizes[1:], weights[1:])]


def _pass_order(n: int, seed: int, source: int) -> list[int]:
    """Source `source`'s fixed shuffled order (seed + 7 * source: replay_schedule's order for source 1)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7 * source)).tolist()


def _without_replacement(sizes: list[int], counts: list[int], seed: int, epoch: int) -> list[list[int]]:
    picks = []
    for s, (n, k) in enumerate(zip(sizes, counts)):
        if s == 0:  # every row of the first source, once
            picks.append(list(range(n)))
            continue
        order = _pass_order(n, seed, s) if n else []
        picks.append([order[p % n] for p in range(epoch * k, (epoch + 1) * k)] if n else [])
    return picks


def _with_replacement(sizes: list[int], weights: list[float], total: int, seed: int, epoch: int) -> list[list[int]]:
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch * 15_485_863 + 1) % (2**63))
    live = torch.tensor([w if n else 0.0 for n, w in zip(sizes, weights)], dtype=torch.float64)
    which = torch.multinomial(live, total, replacement=True, generator=g)
    picks = []
    for s, n in enumerate(sizes):
        k = int((which == s).sum())
        picks.append(sorted(torch.randint(n, (k,), generator=g).tolist()) if k else [])
    return picks


def mix_schedule(sizes: list[int], weights: list[float], seed: int, sampling: str = "without_replacement"):
    """(epoch_subset, epoch_size, counts): the rows of epoch e as indices into the sources laid end to
    end (source i's row r is offset_i + r), the epoch's size, and each source's expected rows per epoch."""
    if sampling not in SAMPLING:
        raise ValueError(f"sampling must be one of {SAMPLING}")
    counts = per_epoch_counts(sizes, weights)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    total = sum(counts)

    def epoch_subset(epoch: int) -> list[int]:
        if sampling == "with_replacement":
            picks = _with_replacement(sizes, weights, total, seed, epoch)
        else:
            picks = _without_replacement(sizes, counts, seed, epoch)
        return [offsets[s] + r for s, rows in enumerate(picks) for r in rows]

    return epoch_subset, total, counts


def source_of(offsets: Sequence[int], index: int) -> int:
    """Which source a global row index belongs to (offsets: each source's first index, then the end)."""
    return int(np.searchsorted(np.asarray(offsets), index, side="right") - 1)


class ConcatTable(Sequence):
    """Encoded tables (data.encoded's, tasks' classification and pair tables) laid end to end: one
    index space over all sources; each of `columns` (per-row numpy arrays of the tables) joined."""

    kind: str | None = None

    def __init__(self, tables: list, columns: tuple[str, ...] = ("lengths", "supervised")):
        self.tables = tables
        self.offsets = np.concatenate([[0], np.cumsum([len(t) for t in tables])]).astype(np.int64)
        for name in columns:
            setattr(self, name, np.concatenate([np.asarray(getattr(t, name), dtype=np.int64) for t in tables]))

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _at(self, i: int) -> tuple[int, int]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        s = source_of(self.offsets, i)
        return s, i - int(self.offsets[s])

    def __getitem__(self, i: int):
        s, j = self._at(i)
        return self.tables[s][j]

    def source(self, i: int) -> str | None:
        s, j = self._at(i)
        return self.tables[s].source(j)


__all__ = ["mix_schedule", "per_epoch_counts", "ConcatTable", "source_of", "SAMPLING"]
