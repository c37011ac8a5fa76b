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

Two steps, so that bad data is reported as such whatever the model: `check_classification_data`
reads and checks every row, chooses the vocabulary and makes the label checks across sources and
the eval split (only one label, a label the split leaves without training rows) from the labels'
counts, with no tokenizer; a run does it before it touches the model (its result, the labels as
written, is a small entry of its own, keyed by the data alone, so a second run reads no file
again). `load_classification_data` then encodes (the entries above) with the model's tokenizer.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tunelab.data.sources import Mix, Source, describe, eval_names, eval_sources, hold_out, mix, train_sources
from tunelab.errors import InputError

log = logging.getLogger("tunelab")


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


def _source_parts(src: Source, data_cfg, limit: int | None) -> tuple[str, list[str], dict]:
    """(format, columns, the key parts of the data alone) of one source: the file, how it is read, its rows."""
    from tunelab.data.cache import file_stamp

    d = data_cfg
    fmt = src.fmt if src.fmt not in (None, "auto") else d.format
    columns = [d.text_column] + ([d.text_pair_column] if d.text_pair_column else []) + [d.label_column]
    return fmt, columns, {"files": [file_stamp(src.path)], "format": fmt, "header": d.header, "columns": columns,
                          "allowed": d.labels, "max_rows": limit}


def _parsed_chunks(src: Source, data_cfg, fmt: str, columns: list[str], limit: int | None, raw):
    """(texts, second texts, label codes, places) per chunk of a source's records, every row checked
    (data.classification.parse_rows) and its label coded in `raw`; at most `limit` rows."""
    from tunelab.data.classification import parse_rows
    from tunelab.data.stream import record_chunks

    d, left = data_cfg, limit
    for records in record_chunks(src.path, fmt, header=d.header, columns=columns):
        if left is not None:
            records, left = records[:left], left - min(left, len(records))
        yield parse_rows(records, Path(src.path), d.text_column, d.label_column, d.text_pair_column, d.labels, raw)
        if left == 0:
            break


def source_labels(src: Source, data_cfg, limit: int | None):
    """The labels of one source as written (data.classification.RawLabels), every row checked, no
    tokenizer: a meta-only cache entry keyed by the data alone (`limit`: data.max_rows, None: all)."""
    from tunelab.data.cache import open_or_build
    from tunelab.data.classification import RawLabels

    fmt, columns, parts = _source_parts(src, data_cfg, limit)

    def build(_writer) -> dict:
        raw = RawLabels()
        for _ in _parsed_chunks(src, data_cfg, fmt, columns, limit, raw):
            pass
        return {"labels": raw.to_meta()}

    store = open_or_build({"encoder": "classification-labels", **parts}, {}, build, what=str(src.path),
                          keep=data_cfg.cache, quiet=True)
    return RawLabels.from_meta(store.meta["labels"])


def encode_source(src: Source, data_cfg, tokenizer, max_len: int, tokenizer_key: str, limit: int | None):
    """(store, RawLabels) of one source: its cache entry, built on the first call (a JSONL file in
    chunks); `limit`: data.max_rows for the rows kept (None: all)."""
    from tunelab.data.cache import open_or_build
    from tunelab.data.classification import Examples, RawLabels, encode_rows
    from tunelab.data.curate import pair_hash

    fmt, columns, parts = _source_parts(src, data_cfg, limit)
    keys, layout = layout_for(tokenizer, data_cfg.text_pair_column is not None)

    def build(writer) -> dict:
        raw, cut = RawLabels(), 0
        for texts, pairs, codes, places in _parsed_chunks(src, data_cfg, fmt, columns, limit, raw):
            feats, flags = encode_rows(Examples(texts, codes, pairs, places), tokenizer, max_len)
            cut += sum(flags)
            writer.add({**{k: [f[k] for f in feats] for k in layout["ragged"]}, "label": codes, "cut": flags,
                        "text_key": [pair_hash(t, p) for t, p in zip(texts, pairs or [None] * len(texts))],
                        "source": places})
        return {"features": keys, "labels": raw.to_meta(), "truncated": cut}

    store = open_or_build({"encoder": "classification", **parts, "max_length": max_len, "tokenizer": tokenizer_key},
                          layout, build, what=str(src.path), keep=data_cfg.cache)
    return store, RawLabels.from_meta(store.meta["labels"])


@dataclass
class CheckedLabels:
    """What check_classification_data found: the label names in id order and, per training source
    (train_sources' order) and per eval source, each label code's id."""

    names: list[str]
    ids: list[list[int]]
    eval_ids: list[list[int]]


def check_classification_data(data_cfg, *, replay_data: str | None = None,
                              replay_ratio: float = 0.0) -> CheckedLabels:
    """Every source's rows read and checked, the vocabulary chosen and the label rules across sources
    applied, before any tokenizer: InputError (file, line, field) for bad data, as training reports it."""
    from tunelab.data.classification import class_eval_count, resolve_labels

    d = data_cfg
    srcs = train_sources(d, replay_data, replay_ratio)
    names, ids, counts = d.labels, [], []
    for k, s in enumerate(srcs):
        why = None
        if k and s.split and d.labels is None:  # another data.train source: the first one's labels rule
            why = (f"label {{label}} does not occur in the first training source ({srcs[0].name}: {{names}}); "
                   "list every label in data.labels to mix sources with other labels")
        raw = source_labels(s, d, d.max_rows if s.split else None)
        names, code_ids = resolve_labels(raw, Path(s.path), d.label_column, names, d.labels is not None, why)
        ids.append(code_ids)
        if s.split:
            counts.append(np.bincount(np.asarray(code_ids, dtype=np.int64), weights=raw.counts,
                                      minlength=len(names)).astype(np.int64))
    total = np.sum(counts, axis=0)
    present = np.flatnonzero(total).tolist()
    if len(present) < 2:
        raise InputError(f"only one label ({names[present[0]]!r}) in the training data; classification needs at "
                         "least two", file=srcs[0].path, field=d.label_column)
    ev = eval_sources(d)
    eval_ids = [resolve_labels(source_labels(s, d, None), Path(s.path), d.label_column, names,
                               d.labels is not None)[1] for s in ev]
    if not ev and d.eval_split > 0:  # the stratified split of each source (hold_out), from the counts alone
        left = sum(np.array([c - class_eval_count(int(c), d.eval_split) for c in per]) for per in counts)
        lost = [names[y] for y in present if left[y] == 0]
        if lost:
            raise InputError(f"eval_split {d.eval_split} of {int(total.sum())} rows leaves no training rows for "
                             f"label {lost[0]!r}; lower data.eval_split or give data.eval", field="data.eval_split")
    return CheckedLabels(names, ids, eval_ids)


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
                             replay_ratio: float = 0.0, checked: CheckedLabels | None = None) -> ClassificationData:
    """Every source encoded (cache), the vocabulary chosen, the eval share held out, the mix planned.

    `data_cfg`: the data section; `seed`: train.seed (the stratified split, the mix); `replay_data`,
    `replay_ratio`: regularization's replay file and its share of each epoch; `checked`: what
    check_classification_data gave for them (checked here when None)."""
    from tunelab.data.cache import tokenizer_stamp
    from tunelab.data.classification import stratified_split

    d = data_cfg
    if checked is None:
        checked = check_classification_data(d, replay_data=replay_data, replay_ratio=replay_ratio)
    srcs = train_sources(d, replay_data, replay_ratio)
    stamp = tokenizer_stamp(tokenizer)  # serialised once for every source

    def table(s: Source, limit: int | None, ids: list[int]) -> ClassTable:
        return ClassTable(encode_source(s, d, tokenizer, max_len, stamp, limit)[0], np.asarray(ids, dtype=np.int64))

    tables = [table(s, d.max_rows if s.split else None, ids) for s, ids in zip(srcs, checked.ids)]
    ev = eval_sources(d)
    evals = {n: table(s, None, ids) for s, n, ids in zip(ev, eval_names(d, ev), checked.eval_ids)}
    tables, held, _ = hold_out(srcs, tables, lambda t: stratified_split(t.labels.tolist(), d.eval_split, seed),
                               has_eval=bool(d.eval))
    evals = evals or held
    own = [t for s, t in zip(srcs, tables) if s.split]
    out = ClassificationData(joined(tables), evals, checked.names, joined(own))
    if len(srcs) > 1:
        units = [len(t) for t in tables]
        out.mix = mix(srcs, units, seed, d.mix_sampling)
        stats = [{"rows": t.store.rows, "truncated": t.store.meta["truncated"]} for t in tables]
        out.sources = describe(srcs, units, units, out.mix, stats)
    return out


def prepare_classification_data(data_cfg, tokenizer, max_len: int, *, replay_data: str | None = None,
                                replay_ratio: float = 0.0) -> list[Path]:
    """Every training and eval source encoded into the cache (tasks.prepare, after check_classification_data);
    the folders of the encoded entries (a cache: false config makes none: [])."""
    from tunelab.data.cache import tokenizer_stamp

    d = data_cfg
    stamp = tokenizer_stamp(tokenizer)
    stores = [encode_source(s, d, tokenizer, max_len, stamp, d.max_rows if s.split else None)[0]
              for s in train_sources(d, replay_data, replay_ratio)]
    stores += [encode_source(s, d, tokenizer, max_len, stamp, None)[0] for s in eval_sources(d)]
    return [st.folder for st in stores if st.folder is not None]


def label_counts(table, names: list[str]) -> dict[str, int]:
    counts = np.bincount(np.asarray(table.labels, dtype=np.int64), minlength=len(names))
    return {n: int(c) for n, c in zip(names, counts)}


def data_quality(train, evaluation) -> dict:
    """Duplicate texts, label conflicts and eval rows also in train (data.curate.quality_counts) over
    the rows as loaded (after the eval split), compared by their texts' hashes, logged as one warning
    line. `train`, `evaluation`: tables (or data.classification.Examples). Training data is not
    changed: `tunelab data clean` is the way to drop them (benchmarks rely on training what the file holds)."""
    from tunelab.data.curate import quality_counts
    from tunelab.data.encoded import UnitSources

    def places(rows):
        return rows.source if isinstance(rows.source, list) else UnitSources(rows)

    none = evaluation is None
    q = quality_counts(list(train.keys), list(train.labels), places(train), [] if none else list(evaluation.keys),
                       [] if none else places(evaluation))
    parts = []
    for n, what, reason in ((q["duplicate_rows"], "rows repeat an earlier text", "duplicate"),
                            (q["label_conflict_rows"], "rows share a text with a row of another label", "label_conflict"),
                            (q["eval_rows_in_train"], "eval rows also appear in the training data", "leakage")):
        if n:
            parts.append(f"{n} {what} (e.g. {', '.join(q['examples'][reason][:2])})")
    if parts:
        log.warning("training data: %s; training uses them as they are (`tunelab data clean` drops them)",
                    "; ".join(parts))
    return q


__all__ = ["ClassTable", "ClassificationData", "CheckedLabels", "check_classification_data", "load_classification_data",
           "prepare_classification_data", "source_labels", "encode_source", "label_counts", "data_quality", "joined"]
