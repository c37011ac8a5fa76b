"""Curation rules over plain rows: which rows to drop, and why, counted per reason.

Pure functions, plain data in and out; `data clean`, `data check` and the warning that `train`
logs all call these, so the three agree on what a duplicate, a conflict or a leak is.

Texts are compared after `normalize_text` (Unicode NFKC, whitespace collapsed, case folded):
"Great  film!" and "great film!" are the same row to a model that sees them a few tokens apart.
Conversations are compared by role and normalised content of every message, in order.

`curate` applies the rules in a fixed order and counts each dropped row under the FIRST rule that
drops it, so the counts add up to the rows dropped:

1. `too_short` / `too_long` (characters), then `too_few_tokens` / `too_many_tokens` when token
   counts are given;
2. `leakage` (eval rows only): the normalised text also appears in the training file;
3. `label_conflict`: the same normalised text under two or more labels; every copy goes, since we
   cannot tell which label is right and a model cannot learn both;
4. `duplicate`: a copy of an earlier kept row (the first copy stays);
5. `near_duplicate` (opt-in): MinHash estimate of word-shingle Jaccard at or above a threshold.

Rows a reader cannot use at all (`empty`, `empty_assistant`, `no_assistant_turn`) are counted by
the loader (tunelab.data.clean) before these rules run.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field

REASONS = ("empty", "empty_assistant", "no_assistant_turn", "too_short", "too_long", "too_few_tokens",
           "too_many_tokens", "leakage", "label_conflict", "duplicate", "near_duplicate")
EXAMPLES_PER_REASON = 5


def normalize_text(text: str) -> str:
    """The form two texts are compared in: NFKC (full-width and ligature forms folded), every run of
    whitespace one space, trimmed, case-folded."""
    return " ".join(unicodedata.normalize("NFKC", text).split()).casefold()


def conversation_key(messages: Sequence[tuple[str, str]]) -> str:
    """A comparison key for a conversation given as (role, content) pairs: roles and normalised
    contents in order, JSON-encoded so no content can imitate a message boundary."""
    return json.dumps([[role, normalize_text(content)] for role, content in messages], ensure_ascii=False)


def pair_key(text: str, pair: str | None) -> str:
    """The key of a (text, second text) classification row; a lone text is its normalised self."""
    if pair is None:
        return normalize_text(text)
    return json.dumps([normalize_text(text), normalize_text(pair)], ensure_ascii=False)


def pair_hash(text: str, pair: str | None) -> int:
    """pair_key as a signed 64-bit hash (blake2b): what a cache entry keeps per row to compare texts."""
    digest = hashlib.blake2b(pair_key(text, pair).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


@dataclass(frozen=True)
class Row:
    """One row as curation sees it: comparison key, the text the length rules measure, the label
    as written (classification; None otherwise) and where it came from ('file:line')."""

    key: str
    text: str
    label: str | None
    source: str


@dataclass(frozen=True)
class Filters:
    """The optional rules: length bounds (inclusive) and near-duplicate threshold; None = off."""

    min_chars: int | None = None
    max_chars: int | None = None
    min_tokens: int | None = None
    max_tokens: int | None = None
    near_duplicate: float | None = None


@dataclass
class Curated:
    """The outcome of `curate`: kept row indices in file order, dropped ones per reason, and for
    duplicates the index of the row each is a copy of."""

    kept: list[int]
    dropped: dict[str, list[int]] = field(default_factory=dict)
    copy_of: dict[int, int] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        return {reason: len(idx) for reason, idx in self.dropped.items() if idx}


# --------------------------------------------------------------------------- single rules


def exact_duplicates(keys: Sequence[str], candidates: Sequence[int] | None = None) -> dict[int, int]:
    """Rows whose key equals an earlier row's: {index of the copy: index of the first row}."""
    first: dict[str, int] = {}
    copies = {}
    for i in range(len(keys)) if candidates is None else candidates:
        j = first.setdefault(keys[i], i)
        if j != i:
            copies[i] = j
    return copies


def label_conflicts(keys: Sequence[str], labels: Sequence[str | None], candidates: Sequence[int] | None = None) -> list[int]:
    """Every row whose key occurs with two or more different labels (all copies, in order)."""
    idx = range(len(keys)) if candidates is None else candidates
    seen: dict[str, set] = {}
    for i in idx:
        seen.setdefault(keys[i], set()).add(labels[i])
    return [i for i in idx if len(seen[keys[i]]) > 1]


def outside(values: Sequence[int], low: int | None, high: int | None,
            candidates: Sequence[int] | None = None) -> tuple[list[int], list[int]]:
    """Rows below `low` and rows above `high` (either bound may be None)."""
    idx = range(len(values)) if candidates is None else candidates
    below = [i for i in idx if low is not None and values[i] < low]
    above = [i for i in idx if high is not None and values[i] > high]
    return below, above


def leaked(train_keys: Sequence[str] | set[str], eval_keys: Sequence[str], candidates: Sequence[int] | None = None) -> list[int]:
    """Eval rows whose key also occurs among the training keys."""
    train = train_keys if isinstance(train_keys, (set, frozenset)) else set(train_keys)
    return [i for i in (range(len(eval_keys)) if candidates is None else candidates) if eval_keys[i] in train]


def percentiles(values: Sequence[int | float], qs: Sequence[int] = (50, 90, 99)) -> dict[str, float]:
    """min, the given percentiles (nearest rank) and max; empty input gives an empty dict."""
    if not values:
        return {}
    ordered = sorted(values)
    out = {"min": ordered[0]}
    for q in qs:
        rank = max(1, -(-q * len(ordered) // 100))  # ceil(q/100 * n), 1-based
        out[f"p{q}"] = ordered[rank - 1]
    out["max"] = ordered[-1]
    return out


# --------------------------------------------------------------------------- all rules


def curate(rows: Sequence[Row], filters: Filters = Filters(), *, train_keys: set[str] | None = None,
           token_counts: Sequence[int] | None = None) -> Curated:
    """Apply the rules of the module docstring in order; `train_keys` (for an eval file) turns on
    leakage, `token_counts` (one per row) the token bounds."""
    live = list(range(len(rows)))
    out = Curated(kept=[])

    def drop(reason: str, idx: Sequence[int]) -> None:
        if idx:
            gone = set(idx)
            out.dropped.setdefault(reason, []).extend(idx)
            live[:] = [i for i in live if i not in gone]

    short, long = outside([len(r.text) for r in rows], filters.min_chars, filters.max_chars, live)
    drop("too_short", short)
    drop("too_long", long)
    if token_counts is not None:
        few, many = outside(token_counts, filters.min_tokens, filters.max_tokens, live)
        drop("too_few_tokens", few)
        drop("too_many_tokens", many)
    keys = [r.key for r in rows]
    if train_keys is not None:
        drop("leakage", leaked(train_keys, keys, live))
    drop("label_conflict", label_conflicts(keys, [r.label for r in rows], live))
    copies = exact_duplicates(keys, live)
    out.copy_of.update(copies)
    drop("duplicate", sorted(copies))
    if filters.near_duplicate is not None:
        from tunelab.data.near_dup import near_duplicates

        near = near_duplicates([rows[i].text for i in live], filters.near_duplicate)
        out.copy_of.update({live[i]: live[j] for i, j in near.items()})
        drop("near_duplicate", sorted(live[i] for i in near))
    out.kept = live
    return out


def describe(curated: Curated, rows: Sequence[Row], extra: dict[str, list[str]] | None = None) -> dict:
    """Counts per reason and a few 'file:line' examples each (a copy names the row it repeats).

    `extra` holds the rows the loader dropped before curation: {reason: [source, ...]}.
    """
    counts = {reason: len(sources) for reason, sources in (extra or {}).items() if sources}
    examples = {reason: list(sources[:EXAMPLES_PER_REASON]) for reason, sources in (extra or {}).items() if sources}
    for reason, idx in curated.dropped.items():
        counts[reason] = counts.get(reason, 0) + len(idx)
        refs = []
        for i in idx[:EXAMPLES_PER_REASON]:
            j = curated.copy_of.get(i)
            refs.append(f"{rows[i].source} (copy of {rows[j].source})" if j is not None else rows[i].source)
        examples.setdefault(reason, []).extend(refs)
    order = {r: n for n, r in enumerate(REASONS)}
    counts = dict(sorted(counts.items(), key=lambda kv: order.get(kv[0], len(order))))
    return {"dropped": counts, "examples": {r: examples[r] for r in counts}}


def quality_counts(keys: Sequence[str], labels: Sequence[str | None], sources: Sequence[str],
                   eval_keys: Sequence[str] = (), eval_sources: Sequence[str] = ()) -> dict:
    """What `train` warns about without changing its data: rows repeating an earlier row's text,
    rows in label conflicts, and eval rows whose text is in the training data, each with a few
    'file:line' examples. All counts are over the data as loaded (nothing dropped first)."""
    copies = exact_duplicates(keys)
    conflicts = label_conflicts(keys, labels)
    leaks = leaked(set(keys), eval_keys) if eval_keys else []
    n = EXAMPLES_PER_REASON
    return {
        "duplicate_rows": len(copies),
        "label_conflict_rows": len(conflicts),
        "eval_rows_in_train": len(leaks),
        "examples": {
            "duplicate": [f"{sources[i]} (copy of {sources[j]})" for i, j in list(copies.items())[:n]],
            "label_conflict": [sources[i] for i in conflicts[:n]],
            "leakage": [eval_sources[i] for i in leaks[:n]] if eval_sources else [],
        },
    }

