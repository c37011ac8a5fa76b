"""The data of a causal-LM or chat run: read, encode (through the encoded-data cache), split off the
eval share, and mix several sources by weight.

`read_and_encode` is one file -> a table of encoded examples (data.encoded), read from the cache
(data.cache) when an entry for the same inputs exists. `load_lm_data` is the data section (with
the task, the seed and the replay file) -> `LMData`: one training table (the sources laid end to
end), its packs, the per-epoch mixing schedule (data.mixing) when there are several sources, and
the eval tables, one per eval source. One source gives exactly what a single file always gave (no
mixing schedule).

`data_cfg` below is the config's data section (config.DataConfig): format, max_rows, overflow,
num_proc, cache, packing, train, eval, eval_split, mix_sampling; `data` is a file's records (ChatData).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from tunelab.data.sources import Source, eval_sources, train_sources  # noqa: F401 (re-exported)
from tunelab.errors import InputError

log = logging.getLogger("tunelab")


def split_indices(n: int, share: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, held-out) example indices: `share` of n held out at random (at least 1, never all)."""
    if share <= 0 or n < 2:
        return list(range(n)), []
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g).tolist()
    n_eval = min(n - 1, max(1, round(n * share)))
    held = set(order[:n_eval])
    return [i for i in range(n) if i not in held], sorted(held)


def split_examples(examples, share: float, seed: int) -> tuple[list, list]:
    train_idx, held_idx = split_indices(len(examples), share, seed)
    if not held_idx:
        return examples, []
    return [examples[i] for i in train_idx], [examples[i] for i in held_idx]


def check_kind(data, task: str, path) -> None:
    """Task chat trains on conversations only."""
    if task == "chat" and data.kind != "conversations":
        raise InputError("task 'chat' needs conversations (openai, sharegpt, alpaca, prompt_completion); "
                         "for plain text use task: causal_lm", file=path, field="data.format")


def read_limited(path: str, data_cfg, task: str, fmt: str | None = None):
    """The data file's records as ChatData, checked against the task, cut to data.max_rows."""
    from tunelab.data.chat import read_chat_data

    data = read_chat_data(path, fmt=_format(data_cfg, fmt))
    check_kind(data, task, path)
    if data_cfg.max_rows:
        data.conversations, data.texts = data.conversations[: data_cfg.max_rows], data.texts[: data_cfg.max_rows]
    return data


def _format(data_cfg, fmt: str | None) -> str:
    """A source's own record format, else data.format."""
    return fmt if fmt not in (None, "auto") else data_cfg.format


def _jsonl_chunks(path: str, data_cfg, task: str, fmt: str | None):
    """A JSONL file's records as ChatData, data.stream.STREAM_ROWS records at a time, checked as
    read_limited checks the whole file, cut to data.max_rows over all chunks."""
    from tunelab.data.chat import chat_records, resolved_format
    from tunelab.data.stream import iter_jsonl_chunks

    want, left = _format(data_cfg, fmt), data_cfg.max_rows
    for records in iter_jsonl_chunks(path):
        want = resolved_format(Path(path), records[0], want)
        data = chat_records(records, Path(path), want)
        check_kind(data, task, path)
        if left is not None:
            data.conversations, data.texts, data.sources = data.conversations[:left], data.texts[:left], data.sources[:left]
            left -= len(data)
        yield data
        if left is not None and left <= 0:
            return


def _encode_chunks(chunks, data_cfg, tokenizer, max_length: int, path: str, keep) -> dict:
    """Encode ChatData chunks one by one, each chunk's examples handed to `keep` before the next is
    read; the entry's meta: kind, the statistics of all chunks as of one file (encode_dataset's),
    the chat template warnings (of the first chunk). InputError when nothing is left to train on."""
    from tunelab.data.chat_template import check_template, encode_dataset

    totals = {"examples": 0, "dropped_overflow": 0, "truncated": 0, "tokens": 0, "supervised_tokens": 0}
    kind, warnings, dropped_sources, supervised = None, None, [], 0
    for data in chunks:
        kind = kind or data.kind
        if warnings is None:
            warnings = check_template(tokenizer, data.conversations) if kind == "conversations" else []
        examples, stats = encode_dataset(data, tokenizer, max_length, overflow=data_cfg.overflow,
                                         num_proc=data_cfg.num_proc, require_examples=False)
        keep(examples)
        supervised += sum(e.supervised() > 0 for e in examples)
        for k in totals:
            totals[k] += stats[k]
        dropped_sources += stats["dropped_sources"][: 20 - len(dropped_sources)]
    if not totals["examples"]:
        raise InputError(f"no example left after encoding: all {totals['dropped_overflow']} were longer than "
                         f"max_length={max_length} with data.overflow {data_cfg.overflow!r}; raise model.max_length or "
                         "use data.overflow: truncate", file=path, field="data.overflow")
    if not supervised:
        raise InputError("no supervised token in the data (no assistant turn survived truncation?)", file=path)
    t, sup = totals["tokens"], totals["supervised_tokens"]
    stats = {**totals, "supervised_share": sup / t if t else 0.0, "dropped_sources": dropped_sources}
    return {"kind": kind, "stats": stats, "warnings": warnings or []}


def encode_file(path: str, data_cfg, tokenizer, max_length: int, task: str, fmt: str | None = None):
    """Read, check and encode a data file whole: (data, examples, stats, template warnings)."""
    data, examples = read_limited(path, data_cfg, task, fmt), []
    meta = _encode_chunks([data], data_cfg, tokenizer, max_length, path, examples.extend)
    return data, examples, meta["stats"], meta["warnings"]


def encode_stream(path: str, data_cfg, tokenizer, max_length: int, task: str, fmt: str | None, writer) -> dict:
    """encode_file for a JSONL file in chunks of data.stream.STREAM_ROWS records, each written to the
    cache entry before the next is read: the first pass holds one chunk, not the file. The examples,
    statistics and errors are those of encode_file; returns the entry's meta."""
    from tunelab.data.encoded import write_examples

    return _encode_chunks(_jsonl_chunks(path, data_cfg, task, fmt), data_cfg, tokenizer, max_length, path,
                          lambda examples: write_examples(writer, examples))


def lm_cache_parts(path: str, data_cfg, tokenizer, max_length: int, task: str, fmt: str | None = None,
                   tokenizer_key: str | None = None) -> dict:
    """Everything that changes what encode_file returns (the data cache's fingerprint); `tokenizer_key`:
    data.cache.tokenizer_stamp(tokenizer), when the caller has it (it serialises the whole tokenizer)."""
    from tunelab.data.cache import file_stamp, tokenizer_stamp

    return {"encoder": "lm", "task": task, "files": [file_stamp(path)], "format": _format(data_cfg, fmt),
            "max_rows": data_cfg.max_rows, "max_length": max_length, "overflow": data_cfg.overflow,
            "tokenizer": tokenizer_key or tokenizer_stamp(tokenizer)}


def read_and_encode(path: str, data_cfg, tokenizer, max_length: int, task: str, fmt: str | None = None,
                    tokenizer_key: str | None = None):
    """(data, table, stats, template warnings) of a data file; `table` (data.encoded) has the examples.

    With data.cache (the default) the examples come from the encoded-data cache (data.cache), built
    on the first run; `data` (the records, for generation prompts) is then None: read_limited reads it.
    """
    from tunelab.data.encoded import LM_LAYOUT, MemoryTable, StoreTable, write_examples

    if not data_cfg.cache:
        data, examples, stats, warnings = encode_file(path, data_cfg, tokenizer, max_length, task, fmt)
        table, kind = MemoryTable(examples), data.kind
    else:
        from tunelab.data.cache import open_or_build
        from tunelab.data.stream import streams

        fresh = {}

        def build(writer) -> dict:
            if streams(path, _format(data_cfg, fmt)):  # bounded memory: chunk by chunk into the entry
                return encode_stream(path, data_cfg, tokenizer, max_length, task, fmt, writer)
            fresh["data"], examples, stats, warnings = encode_file(path, data_cfg, tokenizer, max_length, task, fmt)
            write_examples(writer, examples)
            return {"kind": fresh["data"].kind, "stats": stats, "warnings": warnings}

        parts = lm_cache_parts(path, data_cfg, tokenizer, max_length, task, fmt, tokenizer_key)
        store = open_or_build(parts, LM_LAYOUT, build, what=str(path))
        table, data = StoreTable(store), fresh.get("data")
        kind, stats, warnings = store.meta["kind"], dict(store.meta["stats"]), list(store.meta["warnings"])
    table.kind = kind
    if stats.get("dropped_overflow"):
        log.warning("%s: %d examples longer than %d tokens were dropped (data.overflow: drop)",
                    path, stats["dropped_overflow"], max_length)
    if stats.get("truncated"):
        log.warning("%s: %d examples longer than %d tokens were cut (data.overflow: truncate); "
                    "raise model.max_length to keep them whole", path, stats["truncated"], max_length)
    return data, table, stats, warnings


@dataclass
class LMData:
    """A run's encoded data: `train` (sources end to end), `evals` {name: table} ('' for one
    unnamed eval set), and for several training sources the packs and mixing schedule."""

    train: object
    evals: dict
    kind: str | None
    stats: dict
    warnings: list
    eval_stats: dict | None = None
    eval_data: object = None  # ChatData the generation prompts come from
    units: list | None = None
    mix: object = None  # data.sources.Mix: the per-epoch schedule, each unit's source
    sources: list | None = None  # per-source counts for summary.json

    @property
    def epoch_subset(self):
        return self.mix.epoch_subset if self.mix is not None else None

    @property
    def epoch_size(self) -> int | None:
        return self.mix.epoch_size if self.mix is not None else None


def load_lm_data(data_cfg, tokenizer, max_len: int, *, task: str, seed: int, generating: bool,
                 replay_data: str | None = None, replay_ratio: float = 0.0) -> LMData:
    """Every source read and encoded (cache), the eval share held out per source, the mix planned;
    one source gives exactly what a single file always gave (its packs made by the task, no mix).

    `data_cfg`: the data section; `task`: chat or causal_lm; `seed`: train.seed (the eval split, the
    mix); `replay_data`, `replay_ratio`: regularization's replay file and its share of each epoch."""
    from tunelab.data.cache import tokenizer_stamp
    from tunelab.data.sources import hold_out

    srcs = train_sources(data_cfg, replay_data, replay_ratio)
    stamp = tokenizer_stamp(tokenizer)  # serialised once for every source
    read = [read_and_encode(s.path, data_cfg, tokenizer, max_len, task, s.fmt, stamp) for s in srcs]
    warnings = list(dict.fromkeys(w for _, _, _, ws in read for w in ws))
    for w in warnings:
        log.warning("chat template: %s", w)
    tables, evals, held = hold_out(srcs, [t for _, t, _, _ in read],
                                   lambda t: split_indices(len(t), data_cfg.eval_split, seed), bool(data_cfg.eval))
    eval_stats = eval_data = None
    if data_cfg.eval:
        evals, eval_stats, eval_data = _eval_tables(data_cfg, tokenizer, max_len, task, generating, stamp)
    elif generating and held:  # prompts from the first source's held-out rows (re-read when it came cached)
        from tunelab.evaluate.generation_run import held_out_at

        k, rows = held[0]
        data, table = read[k][0], read[k][1]
        eval_data = held_out_at(data if data is not None else read_limited(srcs[k].path, data_cfg, task, srcs[k].fmt),
                                len(table), rows)
    lm = LMData(tables[0], evals, read[0][1].kind, read[0][2], warnings, eval_stats, eval_data)
    return lm if len(srcs) == 1 else _mixed(lm, data_cfg, seed, srcs, tables, [st for _, _, st, _ in read], max_len)


def _eval_tables(data_cfg, tokenizer, max_len: int, task: str, generating: bool,
                 tokenizer_key: str | None = None) -> tuple[dict, dict | None, object]:
    """({name: table}, encode stats, ChatData for generation prompts) of data.eval (a file or sources)."""
    from tunelab.data.sources import eval_names

    srcs = eval_sources(data_cfg)
    evals, stats, eval_data = {}, None, None
    for s, name in zip(srcs, eval_names(data_cfg, srcs)):
        data, table, st, _ = read_and_encode(s.path, data_cfg, tokenizer, max_len, task, s.fmt, tokenizer_key)
        evals[name] = table
        stats = st if stats is None else stats
        if generating and eval_data is None:  # prompts from the first eval source (re-read when it came cached)
            eval_data = data if data is not None else read_limited(s.path, data_cfg, task, s.fmt)
    return evals, stats if len(srcs) == 1 else None, eval_data


def _mixed(lm: LMData, data_cfg, seed: int, srcs: list, tables: list, stats: list, max_len: int) -> LMData:
    """Several sources end to end, each packed on its own, and the per-epoch mix of their units."""
    from tunelab.data.mixing import ConcatTable
    from tunelab.data.packing import pack
    from tunelab.data.sources import describe, mix

    train = ConcatTable(tables)
    units, sizes = [], []
    for k, t in enumerate(tables):
        start = int(train.offsets[k])
        own = pack(t.lengths, max_len) if data_cfg.packing else [[j] for j in range(len(t))]
        units += [[start + j for j in u] for u in own]
        sizes.append(len(own))
    train.kind = lm.kind
    lm.train, lm.units, lm.mix = train, units, mix(srcs, sizes, seed, data_cfg.mix_sampling)
    lm.sources = describe(srcs, [len(t) for t in tables], sizes, lm.mix, stats)
    lm.stats = {"sources": [s.name for s in srcs]}
    return lm


def prepare_lm_data(*, task: str, model_cfg, data_cfg, replay_data: str | None = None,
                    replay_ratio: float = 0.0) -> list[Path]:
    """Encode every training and eval source into the data cache as setup_causal_lm would, loading
    only the tokenizer and the model's config (not its weights); the cache entries' folders.
    `model_cfg`, `data_cfg`: the model and data sections."""
    from transformers import AutoConfig

    from tunelab.data.cache import tokenizer_stamp
    from tunelab.models.gguf import plain_source
    from tunelab.models.load import load_tokenizer
    from tunelab.models.registry import resolve_model
    from tunelab.train.sizes import usable_max_length

    m = model_cfg
    source = plain_source(resolve_model(m.name))
    tokenizer = load_tokenizer(source, trust_remote_code=m.trust_remote_code, revision=m.revision)
    config = AutoConfig.from_pretrained(source.path, trust_remote_code=m.trust_remote_code, revision=m.revision)
    max_len = usable_max_length(m.max_length, config)
    stamp = tokenizer_stamp(tokenizer)
    tables = [read_and_encode(s.path, data_cfg, tokenizer, max_len, task, s.fmt, stamp)[1]
              for s in train_sources(data_cfg, replay_data, replay_ratio) + eval_sources(data_cfg)]
    return [t.store.folder for t in tables if hasattr(t, "store")]


__all__ = ["read_and_encode", "load_lm_data", "LMData", "split_indices", "split_examples", "prepare_lm_data",
           "train_sources", "eval_sources"]
