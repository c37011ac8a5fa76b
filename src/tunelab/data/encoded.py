"""Encoded LM examples as a table: rows by index, plus every length and supervised count as arrays.

The causal-LM and chat code reads examples through this one interface whether they sit in memory
(`MemoryTable`, data.cache: false) or in a memory-mapped cache entry (`StoreTable`): `table[i]`
is an `EncodedExample`, `table.lengths` / `table.supervised` are numpy arrays (epoch order,
packing and the summaries come from them without touching a token), `table.source(i)` the row's
file:line, `table.subset(idx)` a view (the eval split) that copies nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tunelab.data.chat_template import IGNORE_INDEX, EncodedExample

LM_LAYOUT = {"ragged": {"input_ids": "i4", "labels": "i4"}, "columns": {"supervised": "i8"}, "strings": ("source",)}
CHUNK_ROWS = 4096


class MemoryTable(Sequence):
    """Examples held in a list (the path with the cache off)."""

    kind: str | None = None  # "conversations" | "text", set by whoever read the file

    def __init__(self, examples: list[EncodedExample]):
        self._examples = examples
        self.lengths = np.fromiter((len(e.input_ids) for e in examples), dtype=np.int64, count=len(examples))
        self.supervised = np.fromiter((e.supervised() for e in examples), dtype=np.int64, count=len(examples))

    def __len__(self) -> int:
        return len(self._examples)

    def __getitem__(self, i: int) -> EncodedExample:
        return self._examples[i]

    def source(self, i: int) -> str | None:
        return self._examples[i].source

    def subset(self, idx: list[int]) -> "MemoryTable":
        return MemoryTable([self._examples[i] for i in idx])


class StoreTable(Sequence):
    """Rows `idx` (default all) of a cache entry written with LM_LAYOUT; tokens stay on disk until read."""

    kind: str | None = None

    def __init__(self, store, idx: np.ndarray | None = None):
        self.store = store
        self._idx = None if idx is None else np.asarray(idx, dtype=np.int64)
        self._off = store.offsets()
        self._ids, self._labels = store.ragged("input_ids"), store.ragged("labels")
        lengths, supervised = store.lengths(), np.asarray(store.column("supervised"))
        self.lengths = lengths if self._idx is None else lengths[self._idx]
        self.supervised = supervised if self._idx is None else supervised[self._idx]

    def __len__(self) -> int:
        return self.store.rows if self._idx is None else len(self._idx)

    def _row(self, i: int) -> int:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return i if self._idx is None else int(self._idx[i])

    def __getitem__(self, i: int) -> EncodedExample:
        j = self._row(i)
        a, b = int(self._off[j]), int(self._off[j + 1])
        return EncodedExample(self._ids[a:b].tolist(), self._labels[a:b].tolist(), source=self.source(i))

    def source(self, i: int) -> str | None:
        return self.store.string("source", self._row(i)) or None

    def subset(self, idx: list[int]) -> "StoreTable":
        rows = np.asarray(idx, dtype=np.int64)
        return StoreTable(self.store, rows if self._idx is None else self._idx[rows])


def lengths_of(examples) -> list[int]:
    """Token counts of a table or of a plain list of examples."""
    lengths = getattr(examples, "lengths", None)
    return lengths.tolist() if lengths is not None else [len(e.input_ids) for e in examples]


def supervised_of(examples) -> list[int]:
    sup = getattr(examples, "supervised", None)
    if isinstance(sup, np.ndarray):
        return sup.tolist()
    return [sum(1 for x in e.labels if x != IGNORE_INDEX) for e in examples]


class UnitSources(Sequence):
    """The file:line places of each training unit's examples ("a, b" for a pack; `units` None: each
    row its own unit), made when asked (to name the rows of a NaN/Inf step), not decoded for every
    unit up front."""

    def __init__(self, examples, units: list[list[int]] | None = None):
        self.examples, self.units = examples, units

    def __len__(self) -> int:
        return len(self.units if self.units is not None else self.examples)

    def __getitem__(self, i: int) -> str:
        if not 0 <= i < len(self):
            raise IndexError(i)
        source = getattr(self.examples, "source", None)
        rows = self.units[i] if self.units is not None else [i]
        names = (source(j) if source is not None else self.examples[j].source for j in rows)
        return ", ".join(dict.fromkeys(s for s in names if s)) or f"#{i}"


def write_examples(writer, examples: list[EncodedExample]) -> None:
    """Append encoded examples to a cache entry laid out as LM_LAYOUT, CHUNK_ROWS at a time."""
    for start in range(0, len(examples), CHUNK_ROWS):
        part = examples[start : start + CHUNK_ROWS]
        writer.add({"input_ids": [e.input_ids for e in part], "labels": [e.labels for e in part],
                    "supervised": [e.supervised() for e in part], "source": [e.source or "" for e in part]})


__all__ = ["MemoryTable", "StoreTable", "UnitSources", "LM_LAYOUT", "lengths_of", "supervised_of", "write_examples"]
