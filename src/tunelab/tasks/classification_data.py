"""The data of a classification run: every source read, checked and tokenized once into the
encoded-data cache (data.cache), the label vocabulary chosen, the eval share held out of each
source, and several sources mixed by weight (data.sources, data.mixing).

A source's cache entry holds per row its token ids (and token types, as the tokenizer gives them),
the code of its label as written (data.classification.RawLabels: the entry's meta keeps the
distinct values, so the vocabulary is applied after encoding, with the errors a row-by-row check
gives), whether it was cut at model.max_length, a 64-bit hash of its normalised text (the
duplicate / conflict / leakage counts) and its file:line. The key is the data's, the tokenizer's,
model.max_length, the columns, the format and header options, data.labels and data.max_rows (the
cache module's fingerprint discipline); a JSONL file is read and encoded 10,000 records at a time.

Labels across sources: data.labels when given, else the first training source's labels (sorted,
as for one file) are the vocabulary; every other source (more data.train sources, the replay
file, the eval sources) must use labels among them, else one InputError names the source's file,
line and label. One source with regularization.replay_data gives the rows replay always gave
(the two-source mix [train 1 - r, replay r]).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tunelab.data.sources import Mix, Source, describe, eval_names, eval_sources, hold_out, mix, train_sources
from tunelab.errors import InputError


def text_key(text: str, pair: str | None) -> int:
    """A 64-bit hash of a row's comparison key (data.curate.pair_key): equal texts, equal hashes."""
    from tunelab.data.curate import pair_key

    digest = hashlib.blake2b(pair_key(text, pair).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


class ClassTable(Sequence):
    """Rows `idx` (default all) of a classification cache entry: `table[i]` is the feature dict
    data.classification.encode makes (input_ids, attention_mask, token_type_ids, as the tokenizer
    returns them, unpadded); `labels`, `lengths`, `cut`, `keys` are numpy arrays; `source(i)` the
    row's file:line; `subset(idx)` a view that copies nothing."""

    def __init__(self, store, label_ids: np.ndarray, idx: np.ndarray | None = None):
        self.store, self._ids = store, label_ids
        self._idx = None if idx is None else np.asarray(idx, dtype=np.int64)
        self._features = store.meta["features"]
        self._off = store.offsets()
        self._cols = {k: store.ragged(k) for k in store.manifest["ragged"]}
        rows = slice(None) if self._idx is None else self._idx
        self.labels = label_ids[np.asarray(store.column("label"))][rows]
        self.lengths = store.lengths()[rows]
        self.cut = np.asarray(store.column("cut"))[rows]
        self.keys = np.asarray(store.column("text_key"))[rows]

    def __len__(self) -> int:
        return self.store.rows if self._idx is None else len(self._idx)

    def _row(self, i: int) -> int:
        if not 0 <= i < len(self):
            raise IndexError(i)
        return i if self._idx is None else int(self._idx[i])

    def __getitem__(self, i: int) -> dict:
        j = self._row(i)
        a, b = int(self._off[j]), int(self._off[j + 1])
        return {k: [1] * (b - a) if k == "attention_mask" else self._cols[k][a:b].tolist() for k in self._features}

    def source(self, i: int) -> str:
        return self.store.string("source", self._row(i))

    def subset(self, idx) -> "ClassTable":
        rows = np.asarray(idx, dtype=np.int64)
        return ClassTable(self.store, self._ids, rows if self._idx is None else self._idx[rows])


def layout_for(tokenizer, pairs: bool) -> tuple[list[str], dict]:
    """(feature keys in encode's order, the entry layout): the tokenizer's own outputs, asked once."""
    probe = tokenizer(["a"], ["b"] if pairs else None, truncation=True, max_length=8)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in probe]
    ragged = {k: "i4" for k in keys if k != "attention_mask"}  # attention_mask is all ones unpadded
    return keys, {"ragged": ragged, "columns": {"label": "i4", "cut": "u1", "text_key": "i8"}, "strings": ("source",)}


def encode_source(src: Source, data_cfg, tokenizer, max_len: int, tokenizer_key: str, limit: int | None):
    """(store, RawLabels) of one source: its cache entry, built on the first call (a JSONL file in
    chunks); `limit`: data.max_rows for the rows kept (None: all)."""
    from tunelab.data.cache import file_stamp, open_or_build
    from tunelab.data.classification import Examples, RawLabels, encode_rows, parse_rows
    from tunelab.data.stream import record_chunks

    d, path = data_cfg, src.path
    fmt = src.fmt if src.fmt not in (None, "auto") else d.format
    columns = [d.text_column] + ([d.text_pair_column] if d.text_pair_column else []) + [d.label_column]
    keys, layout = layout_for(tokenizer, d.text_pair_column is not None)
    parts = {"encoder": "classification", "files": [file_stamp(path)], "format": fmt, "header": d.header,
             "columns": columns, "allowed": d.labels, "max_rows": limit, "max_length": max_len,
             "tokenizer": tokenizer_key}

    def build(writer) -> dict:
        raw, left, cut = RawLabels(), limit, 0
        for records in record_chunks(path, fmt, header=d.header, columns=columns):
            if left is not None:
                records, left = records[:left], left - min(left, len(records))
            texts, pairs, codes, places = parse_rows(records, Path(path), d.text_column, d.label_column,
                                                     d.text_pair_column, d.labels, raw)
            feats, flags = encode_rows(Examples(texts, codes, pairs, places), tokenizer, max_len)
            cut += sum(flags)
            writer.add({**{k: [f[k] for f in feats] for k in layout["ragged"]}, "label": codes, "cut": flags,
                        "text_key": [text_key(t, p) for t, p in zip(texts, pairs or [None] * len(texts))],
                        "source": places})
            if left == 0:
                break
        return {"features": keys, "labels": raw.to_meta(), "truncated": cut}

    store = open_or_build(parts, layout, build, what=str(path), keep=d.cache)
    return store, RawLabels.from_meta(store.meta["labels"])


def read_source(src: Source, data_cfg, tokenizer, max_len: int, tokenizer_key: str, names: list[str] | None,
                limit: int | None = None, why_unknown: str | None = None) -> tuple[ClassTable, list[str]]:
    """(table, label names) of one source: `names` None lets this source's labels make the vocabulary."""
    from tunelab.data.classification import resolve_labels

    store, raw = encode_source(src, data_cfg, tokenizer, max_len, tokenizer_key, limit)
    names, ids = resolve_labels(raw, Path(src.path), data_cfg.label_column, names, data_cfg.labels is not None,
                                why_unknown)
    return ClassTable(store, np.asarray(ids, dtype=np.int64)), names


@dataclass
class ClassificationData:
    """A run's encoded classification data: `train` (the sources end to end), `evals` {name: table}
    ('' for one unnamed eval set), the label names, and for several sources the mix and summaries."""

    train: object
    evals: dict
    names: list[str]
    train_rows: object  # the rows of data.train's own sources (not the replay file): counts, cuts, quality
    mix: Mix | None = None
    sources: list | None = None
    quality: dict = field(default_factory=dict)


def joined(tables: list):
    """One table over several (ConcatTable), or the one itself; None for none."""
    from tunelab.data.mixing import ConcatTable

    if not tables:
        return None
    return tables[0] if len(tables) == 1 else ConcatTable(tables, ("lengths", "labels", "cut", "keys"))


def load_classification_data(data_cfg, tokenizer, max_len: int, *, seed: int, replay_data: str | None = None,
                             replay_ratio: float = 0.0) -> ClassificationData:
    """Every source encoded (cache), the vocabulary chosen, the eval share held out, the mix planned.

    `data_cfg`: the data section; `seed`: train.seed (the stratified split, the mix); `replay_data`,
    `replay_ratio`: regularization's replay file and its share of each epoch."""
    from tunelab.data.cache import tokenizer_stamp
    from tunelab.data.classification import stratified_split

    d = data_cfg
    srcs = train_sources(d, replay_data, replay_ratio)
    stamp = tokenizer_stamp(tokenizer)  # serialised once for every source
    names, tables = d.labels, []
    for k, s in enumerate(srcs):
        why = None
        if k and s.split and d.labels is None:  # another data.train source: the first one's labels rule
            why = (f"label {{label}} does not occur in the first training source ({srcs[0].name}: {{names}}); "
                   "list every label in data.labels to mix sources with other labels")
        table, names = read_source(s, d, tokenizer, max_len, stamp, names, d.max_rows if s.split else None, why)
        tables.append(table)
    own = [t for s, t in zip(srcs, tables) if s.split]
    present = sorted(set(np.concatenate([t.labels for t in own]).tolist()))
    rows_before = sum(len(t) for t in own)
    if len(present) < 2:
        raise InputError(f"only one label ({names[present[0]]!r}) in the training data; classification needs at "
                         "least two", file=srcs[0].path, field=d.label_column)

    evals: dict = {}
    if d.eval:
        ev = eval_sources(d)
        evals = {n: read_source(s, d, tokenizer, max_len, stamp, names)[0] for s, n in zip(ev, eval_names(d, ev))}
    tables, held, _ = hold_out(srcs, tables, lambda t: stratified_split(t.labels.tolist(), d.eval_split, seed),
                               has_eval=bool(d.eval))
    evals = evals or held
    own = [t for s, t in zip(srcs, tables) if s.split]
    if held:
        left = set(np.concatenate([t.labels for t in own]).tolist())
        lost = [names[y] for y in present if y not in left]
        if lost:
            raise InputError(f"eval_split {d.eval_split} of {rows_before} rows leaves no training rows for label "
                             f"{lost[0]!r}; lower data.eval_split or give data.eval", field="data.eval_split")

    out = ClassificationData(joined(tables), evals, names, joined(own))
    if len(srcs) > 1:
        units = [len(t) for t in tables]
        out.mix = mix(srcs, units, seed, d.mix_sampling)
        stats = [{"rows": t.store.rows, "truncated": t.store.meta["truncated"]} for t in tables]
        out.sources = describe(srcs, units, units, out.mix, stats)
    return out


def label_counts(table, names: list[str]) -> dict[str, int]:
    counts = np.bincount(np.asarray(table.labels, dtype=np.int64), minlength=len(names))
    return {n: int(c) for n, c in zip(names, counts)}


def data_quality(train, evaluation) -> dict:
    """Duplicate texts, label conflicts and eval rows also in train (data.curate.quality_counts) over
    the rows as loaded (after the eval split), compared by their texts' hashes; nothing is dropped."""
    from tunelab.data.curate import quality_counts
    from tunelab.data.encoded import UnitSources

    no_eval = evaluation is None
    return quality_counts(train.keys.tolist(), train.labels.tolist(), UnitSources(train),
                          [] if no_eval else evaluation.keys.tolist(), [] if no_eval else UnitSources(evaluation))


__all__ = ["ClassTable", "ClassificationData", "load_classification_data", "read_source", "encode_source",
           "label_counts", "data_quality", "joined", "text_key"]
