"""The data of a preference run: every source's pairs read, checked and encoded once into the
encoded-data cache (data.cache), the eval share held out of each source, several sources mixed
by weight (data.sources, data.mixing).

A source's cache entry is the chat layout (data.encoded.LM_LAYOUT) with two rows per pair: row 2i
the chosen side of pair i, row 2i + 1 its rejected side, each with its loss labels (the answer's
tokens) and the pair's file:line. The key is the data's, the tokenizer's (with its chat template),
model.max_length, preference.max_prompt_length and data.max_rows; a JSONL file is read and encoded
10,000 records at a time; the entry's meta holds the cut counts (data.preference.pair_stats).

`check_preference_data` reads and checks every pair with no tokenizer (a meta-only entry per source,
keyed by the data alone), so a run reports bad pairs as such before it loads the model; what
needs the tokenizer (a prompt that alone fills model.max_length) is found while encoding.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tunelab.data.sources import Mix, Source, describe, eval_names, eval_sources, hold_out, mix, train_sources

log = logging.getLogger("tunelab")


class PairTable(Sequence):
    """Pairs `idx` (default all) of a preference cache entry: `table[i]` an EncodedPair; `lengths`
    (both sides' tokens), `widths` (the longer side), `supervised` (both answers' tokens) numpy
    arrays; `source(i)` the pair's file:line; `subset(idx)` a view that copies nothing."""

    def __init__(self, store, idx: np.ndarray | None = None):
        from tunelab.data.encoded import StoreTable

        self.store, self._rows = store, StoreTable(store)
        self._idx = None if idx is None else np.asarray(idx, dtype=np.int64)
        rows = slice(None) if self._idx is None else self._idx
        side = store.lengths()
        sup = np.asarray(store.column("supervised"))
        self.lengths = (side[0::2] + side[1::2])[rows]
        self.widths = np.maximum(side[0::2], side[1::2])[rows]
        self.supervised = (sup[0::2] + sup[1::2])[rows]

    def __len__(self) -> int:
        return self.store.rows // 2 if self._idx is None else len(self._idx)

    def _pair(self, i: int) -> int:
        if not 0 <= i < len(self):
            raise IndexError(i)
        return i if self._idx is None else int(self._idx[i])

    def __getitem__(self, i: int):
        from tunelab.data.preference import EncodedPair

        j = self._pair(i)
        chosen, rejected = self._rows[2 * j], self._rows[2 * j + 1]
        return EncodedPair(chosen, rejected, chosen.source)

    def source(self, i: int) -> str | None:
        return self._rows.source(2 * self._pair(i))

    def subset(self, idx) -> "PairTable":
        rows = np.asarray(idx, dtype=np.int64)
        return PairTable(self.store, rows if self._idx is None else self._idx[rows])


def _source_parts(src: Source, data_cfg, limit: int | None) -> dict:
    """The key parts of one source's data alone (its file, record format, rows); the format checked."""
    from tunelab.data.cache import file_stamp
    from tunelab.data.preference import check_format

    fmt = src.fmt if src.fmt not in (None, "auto") else data_cfg.format
    check_format(fmt)
    return {"files": [file_stamp(src.path)], "format": fmt, "max_rows": limit}


def _parsed_chunks(src: Source, limit: int | None):
    """The pairs of a source, chunk by chunk, every one checked (data.preference.parse_pairs); at most `limit`."""
    from tunelab.data.preference import parse_pairs
    from tunelab.data.stream import record_chunks

    left, first = limit, True
    for records in record_chunks(src.path):
        if left is not None:
            records, left = records[:left], left - min(left, len(records))
        yield parse_pairs(records, Path(src.path), first)
        first = False
        if left == 0:
            break


def check_pair_source(src: Source, data_cfg, limit: int | None) -> int:
    """The number of pairs of one source, every pair checked, no tokenizer (a meta-only cache entry)."""
    from tunelab.data.cache import open_or_build

    def build(_writer) -> dict:
        return {"pairs": sum(len(pairs) for pairs in _parsed_chunks(src, limit))}

    store = open_or_build({"encoder": "preference-pairs", **_source_parts(src, data_cfg, limit)}, {}, build,
                          what=str(src.path), keep=data_cfg.cache, quiet=True)
    return int(store.meta["pairs"])


def check_preference_data(data_cfg) -> None:
    """Every training and eval pair read and checked before any tokenizer: InputError (file, line,
    field) for bad data, as training reports it, whatever the model."""
    for s in train_sources(data_cfg):
        check_pair_source(s, data_cfg, data_cfg.max_rows)
    for s in eval_sources(data_cfg):
        check_pair_source(s, data_cfg, data_cfg.max_rows)


def read_pair_source(src: Source, data_cfg, tokenizer, max_len: int, max_prompt_length: int | None,
                     tokenizer_key: str, limit: int | None) -> tuple[PairTable, dict]:
    """(pairs, encode stats) of one source, from its cache entry (built on the first call)."""
    from tunelab.data.cache import open_or_build
    from tunelab.data.chat_template import EncodedExample
    from tunelab.data.encoded import LM_LAYOUT, write_examples
    from tunelab.data.preference import encode_pairs, pair_stats

    path = src.path
    parts = {"encoder": "preference", **_source_parts(src, data_cfg, limit), "max_length": max_len,
             "max_prompt_length": max_prompt_length, "tokenizer": tokenizer_key}

    def build(writer) -> dict:
        stats = []
        for pairs in _parsed_chunks(src, limit):
            encoded, st = encode_pairs(pairs, tokenizer, max_len, max_prompt_length)
            stats.append(st)
            write_examples(writer, [EncodedExample(ex.input_ids, ex.labels, source=p.source)
                                    for p in encoded for ex in (p.chosen, p.rejected)])
        return {"stats": pair_stats(stats)}

    store = open_or_build(parts, LM_LAYOUT, build, what=str(path), keep=data_cfg.cache)
    stats = dict(store.meta["stats"])
    for key, what in (("truncated_prompts", "prompts lost their beginning"), ("truncated_answers", "answers lost their end")):
        if stats[key]:
            log.warning("%s: %d of %d pairs are longer than %d tokens: %s (raise model.max_length to keep them whole)",
                        path, stats[key], stats["pairs"], max_len, what)
    return PairTable(store), stats


@dataclass
class PreferenceData:
    """A run's encoded pairs: `train` (the sources end to end), `evals` {name: pairs} ('' for one
    unnamed eval set), the encode stats, and for several training sources the mix and summaries."""

    train: object
    evals: dict
    stats: dict
    eval_stats: dict | None = None
    mix: Mix | None = None
    sources: list | None = None


def load_preference_data(data_cfg, tokenizer, max_len: int, max_prompt_length: int | None, *, seed: int,
                         replay_data: str | None = None, replay_ratio: float = 0.0) -> PreferenceData:
    """Every source's pairs encoded (cache), the eval share held out per source (at random, as
    tasks.lm_data.split_indices), the mix planned. `data_cfg`: the data section; `max_prompt_length`:
    preference.max_prompt_length; `seed`: train.seed."""
    from tunelab.data.cache import tokenizer_stamp
    from tunelab.data.mixing import ConcatTable
    from tunelab.tasks.lm_data import split_indices

    d = data_cfg
    srcs = train_sources(d, replay_data, replay_ratio)
    stamp = tokenizer_stamp(tokenizer)  # serialised once for every source
    read = [read_pair_source(s, d, tokenizer, max_len, max_prompt_length, stamp, d.max_rows) for s in srcs]
    evals, eval_stats = {}, None
    if d.eval:
        ev = eval_sources(d)
        got = [read_pair_source(s, d, tokenizer, max_len, max_prompt_length, stamp, d.max_rows) for s in ev]
        evals = {n: t for (t, _), n in zip(got, eval_names(d, ev))}
        eval_stats = got[0][1] if len(got) == 1 else None
    tables, held, _ = hold_out(srcs, [t for t, _ in read], lambda t: split_indices(len(t), d.eval_split, seed),
                               has_eval=bool(d.eval))
    evals = evals or held
    columns = ("lengths", "widths", "supervised")
    out = PreferenceData(tables[0] if len(tables) == 1 else ConcatTable(tables, columns), evals, read[0][1], eval_stats)
    if len(srcs) > 1:
        units = [len(t) for t in tables]
        out.mix = mix(srcs, units, seed, d.mix_sampling)
        out.sources = describe(srcs, units, units, out.mix, [st for _, st in read])
        out.stats = {"sources": [s.name for s in srcs]}
    return out


def prepare_preference_data(data_cfg, tokenizer, max_len: int, max_prompt_length: int | None) -> list[Path]:
    """Every training and eval source encoded into the cache (tasks.prepare, after check_preference_data);
    the entries' folders."""
    from tunelab.data.cache import tokenizer_stamp

    stamp = tokenizer_stamp(tokenizer)
    tables = [read_pair_source(s, data_cfg, tokenizer, max_len, max_prompt_length, stamp, data_cfg.max_rows)[0]
              for s in train_sources(data_cfg) + eval_sources(data_cfg)]
    return [t.store.folder for t in tables if t.store.folder is not None]


__all__ = ["PairTable", "PreferenceData", "load_preference_data", "read_pair_source", "check_preference_data",
           "check_pair_source", "prepare_preference_data"]
