"""Classification examples: validate records, map labels to ids, split off an eval share.

Plain records in, plain lists out. Every rule that a row can break has its own message naming the
file, line and field.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.data.batching import pad_batch
from tunelab.data.readers import MAX_FIELD_CHARS, DroppableRowError, Record, read_records
from tunelab.errors import InputError


@dataclass
class Examples:
    """Texts (and optional second texts) with integer labels; `source` keeps file:line per row."""

    texts: list[str]
    labels: list[int]
    pairs: list[str] | None = None
    source: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def keys(self) -> list[int]:
        """Each row's text hash (data.curate.pair_hash), as the cached tables keep it."""
        from tunelab.data.curate import pair_hash

        return [pair_hash(t, p) for t, p in zip(self.texts, self.pairs or [None] * len(self))]

    def subset(self, idx: list[int]) -> "Examples":
        return Examples(
            [self.texts[i] for i in idx],
            [self.labels[i] for i in idx],
            [self.pairs[i] for i in idx] if self.pairs is not None else None,
            [self.source[i] for i in idx] if self.source else [],
        )


def record_text(rec: Record, path: Path, column: str, key: str = "data.text_column") -> str:
    """The text in `column` of one record (`key`: the config key naming it, for a missing column); an
    empty text raises DroppableRowError (reason 'empty')."""
    if column not in rec.fields:
        cols = ", ".join(sorted(rec.fields)) or "none"
        raise InputError(f"missing column (columns present: {cols}); set {key}", file=path, field=column, **rec.where())
    value = rec.fields[column]
    if value is None:
        raise InputError("text is null", file=path, field=column, **rec.where())
    if not isinstance(value, str):
        raise InputError(f"text must be a string, got {type(value).__name__} {value!r:.40}", file=path, field=column, **rec.where())
    if not value.strip():
        raise DroppableRowError("text is empty", reason="empty", file=path, field=column, **rec.where())
    if len(value) > MAX_FIELD_CHARS:  # the CSV reader refuses such a field too: a lost newline or quote
        raise InputError(f"text has {len(value):,} characters, more than the limit of {MAX_FIELD_CHARS} "
                         "(several records run together?)", file=path, field=column, **rec.where())
    return value


def record_label(rec: Record, path: Path, column: str) -> str | int:
    """A label as written: a name (str) or an id (int). Int-like strings from CSV become ints."""
    if column not in rec.fields:
        cols = ", ".join(sorted(rec.fields)) or "none"
        raise InputError(f"missing column (columns present: {cols}); set data.label_column", file=path, field=column, **rec.where())
    value = rec.fields[column]
    if value is None or (isinstance(value, str) and not value.strip()):
        raise InputError("label is empty", file=path, field=column, **rec.where())
    if isinstance(value, bool):
        raise InputError(f"label is a boolean ({value}); use 0/1 or label names", file=path, field=column, **rec.where())
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise InputError(f"label {value!r} is not a whole number or a name", file=path, field=column, **rec.where())
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        s = value.strip()
        if s.lstrip("-").isdigit():
            return int(s)
        try:  # "1.0" is the id 1; "0.5", "nan" and "inf" are a score or a lost value, not a class
            number = float(s)
        except ValueError:
            return s
        if math.isfinite(number) and number == int(number):
            return int(number)
        raise InputError(f"label {s!r} is not a whole number or a name", file=path, field=column, **rec.where())
    raise InputError(f"label must be a name or an integer, got {type(value).__name__}", file=path, field=column, **rec.where())


# Labels that mean "no value" in spreadsheets, pandas and databases; as classes they are almost always
# a lost value. Listing one in data.labels opts in to it as a real class name.
MISSING_LABELS = frozenset({"none", "null", "nil", "nan", "na", "n/a", "#n/a", "<na>", "missing", "undefined", "?", "-", "--"})


def check_missing_label(value, rec: Record, path: Path, column: str, names: list[str] | None) -> None:
    if isinstance(value, str) and value.strip().lower() in MISSING_LABELS and value not in (names or ()):
        raise InputError(f"label {value!r} looks like a missing value; fill it in or drop the row "
                         "(or list it in data.labels to use it as a class name)", file=path, field=column, **rec.where())


def label_names_from(values: list[str | int], declared: list[str] | None) -> list[str]:
    """The label vocabulary in id order: declared, or sorted ints, or sorted names."""
    if declared:
        if len(set(declared)) != len(declared):
            raise InputError("data.labels holds a name twice", field="data.labels")
        return list(declared)
    kinds = {type(v) for v in values}
    if kinds == {int}:
        return [str(v) for v in sorted(set(values))]
    if kinds == {str}:
        return sorted(set(values))
    raise InputError("labels mix names and numbers; use one kind, or list them in data.labels", field="data.labels")


def check_one_kind(raw: list[str | int], records: list[Record], path: Path, column: str) -> None:
    """Labels are all names or all ids; point at the first label of the rarer kind."""
    labels = RawLabels()
    for value, rec in zip(raw, records):
        labels.add(value, rec)
    labels.check_one_kind(path, column)


class RawLabels:
    """A file's labels as written, dictionary-encoded: the distinct values in the order they first
    occur (a row holds the code of its value), each one's row count and its first row. The checks
    and the mapping onto label ids work on the values, not the rows, so a cache entry keeps one
    small code per row and the label vocabulary can be chosen after encoding (data.labels, the
    first training source's labels) with the same errors at the same rows as a row-by-row check."""

    def __init__(self, values: list | None = None, counts: list[int] | None = None, first: list | None = None):
        self.values: list[str | int] = list(values or [])
        self.counts: list[int] = list(counts or [])
        self.first: list[tuple[int, dict]] = [(int(i), dict(w)) for i, w in (first or [])]  # (record index, where)
        self._code = {(type(v), v): c for c, v in enumerate(self.values)}

    def add(self, value: str | int, rec: Record) -> int:
        """The code of a row's label (a new value gets the next one)."""
        code = self._code.get((type(value), value))
        if code is None:
            code = self._code[(type(value), value)] = len(self.values)
            self.values.append(value)
            self.counts.append(0)
            self.first.append((rec.index, rec.where()))
        self.counts[code] += 1
        return code

    def to_meta(self) -> dict:
        return {"values": self.values, "counts": self.counts, "first": [[i, w] for i, w in self.first]}

    @classmethod
    def from_meta(cls, meta: dict) -> "RawLabels":
        return cls(meta["values"], meta["counts"], meta["first"])

    def check_one_kind(self, path: Path, column: str) -> None:
        """Labels are all names or all ids; point at the first label of the rarer kind."""
        n = sum(self.counts)
        ints = sum(c for v, c in zip(self.values, self.counts) if isinstance(v, int))
        if 0 < ints < n:
            odd = int if ints <= n - ints else str
            code = min((c for c, v in enumerate(self.values) if isinstance(v, odd)), key=lambda c: self.first[c][0])
            kind, others = ("a number", "names") if odd is int else ("a name", "numbers")
            raise InputError(f"label {self.values[code]!r} is {kind} but the other labels are {others}; use one "
                             "kind, or list the names in data.labels", file=path, field=column, **self.first[code][1])

    def ids(self, names: list[str], declared: bool, path: Path, column: str, why_unknown: str) -> list[int]:
        """Each code's label id in `names`; an unknown label raises at the first row holding one, its
        message `why_unknown` formatted with the label and the names."""
        ids = [to_id(v, names, declared) for v in self.values]
        unknown = [c for c, i in enumerate(ids) if i is None]
        if unknown:
            code = min(unknown, key=lambda c: self.first[c][0])
            raise InputError(why_unknown.format(label=repr(self.values[code]), names=names), file=path, field=column,
                             **self.first[code][1])
        return ids


def resolve_labels(raw: RawLabels, path: Path, column: str, label_names: list[str] | None, declared: bool,
                   why_unknown: str | None = None) -> tuple[list[str], list[int]]:
    """(label names in id order, each code's id): with `label_names` (declared, or the training
    data's) every label must be in them; else the file's own labels, all of one kind, make them."""
    fixed = label_names is not None
    if not fixed:
        raw.check_one_kind(path, column)
    names = label_names if fixed else label_names_from(raw.values, None)
    if why_unknown is None:
        why_unknown = ("label {label} does not occur in the training data {names}" if fixed and not declared
                       else "label {label} is not one of {names}")
    return names, raw.ids(names, declared, path, column, why_unknown)


def row_source(path: Path, rec: Record) -> str:
    """A classification row's place, as summaries and errors name it: file name and line (or #index)."""
    return f"{path.name}:{rec.line}" if rec.line is not None else f"{path.name}#{rec.index}"


def parse_rows(records: list[Record], path: Path, text_column: str, label_column: str, text_pair_column: str | None,
               allowed: list[str] | None, labels: RawLabels) -> tuple[list[str], list[str] | None, list[int], list[str]]:
    """(texts, second texts, label codes, file:line places) of records, every row checked; `allowed`:
    the label names that may look like a missing value (data.labels), `labels` collects the codes."""
    texts, pairs, codes, source = [], [] if text_pair_column else None, [], []
    for rec in records:
        texts.append(record_text(rec, path, text_column))
        if pairs is not None:
            pairs.append(record_text(rec, path, text_pair_column, "data.text_pair_column"))
        value = record_label(rec, path, label_column)
        check_missing_label(value, rec, path, label_column, allowed)
        codes.append(labels.add(value, rec))
        source.append(row_source(path, rec))
    return texts, pairs, codes, source


def to_id(value: str | int, names: list[str], declared: bool) -> int | None:
    """Map a raw label onto an id by name; a bare integer is an id only for a declared vocabulary."""
    key = str(value)
    if key in names:
        return names.index(key)
    if isinstance(value, int) and declared and 0 <= value < len(names):
        return value
    return None


def load_examples(
    path: str | Path,
    *,
    text_column: str = "text",
    label_column: str = "label",
    text_pair_column: str | None = None,
    fmt: str = "auto",
    label_names: list[str] | None = None,
    declared: bool = False,
    max_rows: int | None = None,
    header: bool | None = None,
) -> tuple[Examples, list[str]]:
    """Read and validate a labelled file. With `label_names`, labels must be in it (eval files).

    `header` (CSV/TSV): True, False (the columns are text[, text pair], label in that order) or None
    to detect it (readers._has_header). Returns the examples and the label names in id order.
    """
    path = Path(path)
    columns = [text_column] + ([text_pair_column] if text_pair_column else []) + [label_column]
    records = read_records(path, fmt, header=header, columns=columns)
    if max_rows is not None:
        records = records[:max_rows]
    raw = RawLabels()
    texts, pairs, codes, source = parse_rows(records, path, text_column, label_column, text_pair_column, label_names,
                                             raw)
    names, ids = resolve_labels(raw, path, label_column, label_names, declared)
    return Examples(texts, [ids[c] for c in codes], pairs, source), names


def load_train_eval(data_cfg, seed: int) -> tuple[Examples, Examples | None, list[str]]:
    """Training and evaluation examples per the data config (eval file, or a stratified split)."""
    declared = data_cfg.labels is not None
    common = dict(
        text_column=data_cfg.text_column,
        label_column=data_cfg.label_column,
        text_pair_column=data_cfg.text_pair_column,
        fmt=data_cfg.format,
        declared=declared,
        header=data_cfg.header,
    )
    train, names = load_examples(data_cfg.train, label_names=data_cfg.labels, max_rows=data_cfg.max_rows, **common)
    present = sorted(set(train.labels))
    if len(present) < 2:
        raise InputError(
            f"only one label ({names[present[0]]!r}) in the training data; classification needs at least two",
            file=data_cfg.train,
            field=data_cfg.label_column,
        )
    if data_cfg.eval:
        evaluation, _ = load_examples(data_cfg.eval, label_names=names, **common)
        return train, evaluation, names
    if data_cfg.eval_split == 0:
        return train, None, names
    train_idx, eval_idx = stratified_split(train.labels, data_cfg.eval_split, seed)
    if not eval_idx:
        return train, None, names
    left = {train.labels[i] for i in train_idx}
    lost = [names[y] for y in present if y not in left]
    if lost:
        raise InputError(f"eval_split {data_cfg.eval_split} of {len(train)} rows leaves no training rows for "
                         f"label {lost[0]!r}; lower data.eval_split or give data.eval", field="data.eval_split")
    return train.subset(train_idx), train.subset(eval_idx), names


def stratified_split(labels: list[int], share: float, seed: int) -> tuple[list[int], list[int]]:
    """Hold out `share` of each class (at least one row of any class with 2+ rows)."""
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    train_idx, eval_idx = [], []
    for y in sorted(by_class):
        idx = by_class[y]
        rng.shuffle(idx)
        n_eval = class_eval_count(len(idx), share)
        eval_idx += idx[:n_eval]
        train_idx += idx[n_eval:]
    return sorted(train_idx), sorted(eval_idx)


def class_eval_count(rows: int, share: float) -> int:
    """How many of a class's `rows` stratified_split holds out: `share` of them, at least one of 2+."""
    n_eval = round(rows * share)
    return 1 if n_eval == 0 and rows >= 2 and share > 0 else n_eval


def label_counts(ex: Examples, names: list[str]) -> dict[str, int]:
    counts = {n: 0 for n in names}
    for y in ex.labels:
        counts[names[y]] += 1
    return counts


def encode_rows(examples: Examples, tokenizer, max_length: int) -> tuple[list[dict], list[bool]]:
    """Token ids per example (no padding) and, per example, whether it was cut at `max_length`."""
    enc = tokenizer(examples.texts, examples.pairs, truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    features = [{k: enc[k][i] for k in keys} for i in range(len(examples))]
    # only an example that fills max_length can have been cut: tokenize just those again, whole
    at_limit = [i for i, f in enumerate(features) if len(f["input_ids"]) >= max_length]
    cut = [False] * len(features)
    if at_limit:
        texts = [examples.texts[i] for i in at_limit]
        pairs = [examples.pairs[i] for i in at_limit] if examples.pairs is not None else None
        full = tokenizer(texts, pairs, truncation=False)["input_ids"]
        for i, ids in zip(at_limit, full):
            cut[i] = len(ids) > max_length
    return features, cut


def encode(examples: Examples, tokenizer, max_length: int) -> tuple[list[dict], int]:
    """Token ids per example (no padding) and how many were cut at `max_length`."""
    features, cut = encode_rows(examples, tokenizer, max_length)
    return features, sum(cut)


def make_batches(features, labels, pad_id: int, batch_size: int, lengths=None):
    """Padded batches in file order (for evaluation), grouped by length to pad little. `features`:
    a list of feature dicts, or a table of them (with its `lengths`, so no row is read to sort)."""
    lengths = [len(f["input_ids"]) for f in features] if lengths is None else lengths
    order = sorted(range(len(features)), key=lambda i: lengths[i])
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        yield pad_batch([features[i] for i in idx], pad_id, [labels[i] for i in idx])
