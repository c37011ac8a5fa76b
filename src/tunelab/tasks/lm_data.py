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
from dataclasses import dataclass, field
from pathlib import Path

import torch

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


def read_limited(path: str, data_cfg, task: str, fmt: str | None = None):
    """The data file's records as ChatData, checked against the task, cut to data.max_rows."""
    from tunelab.data.chat import read_chat_data

    data = read_chat_data(path, fmt=_format(data_cfg, fmt))
    if task == "chat" and data.kind != "conversations":
        raise InputError("task 'chat' needs conversations (openai, sharegpt, alpaca, prompt_completion); "
                         "for plain text use task: causal_lm", file=path, field="data.format")
    if data_cfg.max_rows:
        data.conversations, data.texts = data.conversations[: data_cfg.max_rows], data.texts[: data_cfg.max_rows]
    return data


def _format(data_cfg, fmt: str | None) -> str:
    """A source's own record format, else data.format."""
    return fmt if fmt not in (None, "auto") else data_cfg.format


def encode_file(path: str, data_cfg, tokenizer, max_length: int, task: str, fmt: str | None = None):
    """Read, check and encode a data file: (data, examples, stats, template warnings)."""
    from tunelab.data.chat_template import check_template, encode_dataset

    data = read_limited(path, data_cfg, task, fmt)
    warnings = check_template(tokenizer, data.conversations) if data.kind == "conversations" else []
    examples, stats = encode_dataset(data, tokenizer, max_length, overflow=data_cfg.overflow,
                                     num_proc=data_cfg.num_proc)
    if not examples:
        raise InputError(f"no example left after encoding ({stats})", file=path, field="data.train")
    if not any(e.supervised() for e in examples):
        raise InputError("no supervised token in the data (no assistant turn survived truncation?)", file=path)
    return data, examples, dict(stats), warnings


def encode_stream(path: str, data_cfg, tokenizer, max_length: int, task: str, fmt: str | None, writer) -> dict:
    """encode_file for a JSONL file in chunks of data.stream.STREAM_ROWS records, each written to the
    cache entry before the next is read: the first pass holds one chunk, not the file. The examples,
    statistics and errors are those of encode_file; returns the entry's meta."""
    from tunelab.data.chat import ChatData, detect_chat_format, parse_record
    from tunelab.data.chat_template import check_template, encode_dataset
    from tunelab.data.encoded import write_examples
    from tunelab.data.stream import iter_jsonl_chunks

    want, kind, left = _format(data_cfg, fmt), None, data_cfg.max_rows
    totals = {"examples": 0, "dropped_overflow": 0, "truncated": 0, "tokens": 0, "supervised_tokens": 0}
    dropped_sources, warnings, supervised = [], None, 0
    for records in iter_jsonl_chunks(path):
        if want == "auto":
            want = detect_chat_format(Path(path), records[0])
        data = ChatData("text" if want == "text" else "conversations")
        if kind is None:
            kind = data.kind
            if task == "chat" and kind != "conversations":
                raise InputError("task 'chat' needs conversations (openai, sharegpt, alpaca, prompt_completion); "
                                 "for plain text use task: causal_lm", file=path, field="data.format")
        for rec in records:
            parsed = parse_record(rec, Path(path), want)
            where = f"{path}:{rec.line}"
            if isinstance(parsed, str):
                data.texts.append(parsed)
                data.sources.append(where)
            else:
                data.conversations += parsed
                data.sources += [where] * len(parsed)
        if left is not None:
            data.conversations, data.texts, data.sources = data.conversations[:left], data.texts[:left], data.sources[:left]
            left -= len(data)
        if warnings is None:
            warnings = check_template(tokenizer, data.conversations) if kind == "conversations" else []
        examples, stats = encode_dataset(data, tokenizer, max_length, overflow=data_cfg.overflow,
                                         num_proc=data_cfg.num_proc, require_examples=False)
        write_examples(writer, examples)
        supervised += sum(e.supervised() > 0 for e in examples)
        for k in totals:
            totals[k] += stats[k]
        dropped_sources += stats["dropped_sources"][: 20 - len(dropped_sources)]
        if left is not None and left <= 0:
            break
    if not totals["examples"]:
        raise InputError(f"no example left after encoding ({totals})", file=path, field="data.train")
    if not supervised:
        raise InputError("no supervised token in the data (no assistant turn survived truncation?)", file=path)
    t, sup = totals["tokens"], totals["supervised_tokens"]
    stats = {**totals, "supervised_share": sup / t if t else 0.0, "dropped_sources": dropped_sources}
    return {"kind": kind, "stats": stats, "warnings": warnings or []}


def lm_cache_parts(path: str, data_cfg, tokenizer, max_length: int, task: str, fmt: str | None = None) -> dict:
    """Everything that changes what encode_file returns (the data cache's fingerprint)."""
    from tunelab.data.cache import file_stamp, tokenizer_stamp

    return {"encoder": "lm", "task": task, "files": [file_stamp(path)], "format": _format(data_cfg, fmt),
            "max_rows": data_cfg.max_rows, "max_length": max_length, "overflow": data_cfg.overflow,
            "tokenizer": tokenizer_stamp(tokenizer)}


def read_and_encode(path: str, data_cfg, tokenizer, max_length: int, task: str, fmt: str | None = None):
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

        store = open_or_build(lm_cache_parts(path, data_cfg, tokenizer, max_length, task, fmt), LM_LAYOUT, build,
                              what=str(path))
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


@dataclass(frozen=True)
class Source:
    """One training or eval source: its file, record format, weight and name."""

    path: str
    fmt: str | None = None
    weight: float = 1.0
    name: str | None = None
    split: bool = True  # whether data.eval_split holds out a share of it (not for the replay file)


def train_sources(data_cfg, replay_data: str | None = None, replay_ratio: float = 0.0) -> list[Source]:
    """data.train as sources; regularization.replay_data adds the replay file at replay_ratio."""
    d = data_cfg
    if isinstance(d.train, list):
        return [Source(s.path, s.format, s.weight, s.label()) for s in d.train]
    if replay_data and replay_ratio > 0:  # replay is the two-source mix [train 1 - r, replay r]
        return [Source(d.train, None, 1 - replay_ratio, Path(d.train).stem),
                Source(replay_data, None, replay_ratio, "replay", split=False)]
    return [Source(d.train)]


def eval_sources(data_cfg) -> list[Source]:
    d = data_cfg
    if isinstance(d.eval, list):
        return [Source(s.path, s.format, s.weight, s.label()) for s in d.eval]
    return [Source(d.eval)] if d.eval else []


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
    epoch_subset: object = None
    epoch_size: int | None = None
    sources: list | None = None  # per-source counts for summary.json


def load_lm_data(data_cfg, tokenizer, max_len: int, *, task: str, seed: int, generating: bool,
                 replay_data: str | None = None, replay_ratio: float = 0.0) -> LMData:
    """Every source read and encoded (cache), the eval share held out per source, the mix planned.

    `data_cfg`: the data section; `task`: chat or causal_lm; `seed`: train.seed (the eval split, the
    mix); `replay_data`, `replay_ratio`: regularization's replay file and its share of each epoch."""
    srcs = train_sources(data_cfg, replay_data, replay_ratio)
    if len(srcs) == 1:
        return _one_source(data_cfg, srcs[0], tokenizer, max_len, task, seed, generating)
    read = [read_and_encode(s.path, data_cfg, tokenizer, max_len, task, s.fmt) for s in srcs]
    for w in dict.fromkeys(w for _, _, _, ws in read for w in ws):
        log.warning("chat template: %s", w)
    tables, evals, eval_data = [], {}, None
    for s, (data, table, _, _) in zip(srcs, read):
        keep, held = (split_indices(len(table), data_cfg.eval_split, seed) if s.split and not data_cfg.eval
                      else (None, []))
        if held:
            evals[s.name] = table.subset(held)
            if generating and eval_data is None:
                from tunelab.evaluate.generation_run import held_out_at

                eval_data = held_out_at(data if data is not None else read_limited(s.path, data_cfg, task, s.fmt),
                                        len(table), held)
            table = table.subset(keep)
        tables.append(table)
    eval_stats = None
    if data_cfg.eval:
        evals, eval_stats, eval_data = _eval_tables(data_cfg, tokenizer, max_len, task, generating)
    return _mixed(data_cfg, seed, srcs, tables, read, evals, eval_stats, eval_data, max_len)


def _one_source(data_cfg, src: Source, tokenizer, max_len: int, task: str, seed: int, generating: bool) -> LMData:
    """A single training file: what tunelab always did (no mixing schedule)."""
    from tunelab.evaluate.generation_run import held_out_at

    data, train, stats, warnings = read_and_encode(src.path, data_cfg, tokenizer, max_len, task, src.fmt)
    for w in warnings:
        log.warning("chat template: %s", w)
    kind, eval_stats, eval_data, evals = train.kind, None, None, {}
    if data_cfg.eval:
        evals, eval_stats, eval_data = _eval_tables(data_cfg, tokenizer, max_len, task, generating)
    else:
        n_all = len(train)
        train_idx, held_idx = split_indices(n_all, data_cfg.eval_split, seed)
        if held_idx:
            train, evals = train.subset(train_idx), {"": train.subset(held_idx)}
            if generating:
                eval_data = held_out_at(data if data is not None else read_limited(src.path, data_cfg, task, src.fmt),
                                        n_all, held_idx)
    return LMData(train, evals, kind, stats, warnings, eval_stats, eval_data)


def _eval_tables(data_cfg, tokenizer, max_len: int, task: str, generating: bool) -> tuple[dict, dict | None, object]:
    """({name: table}, encode stats, ChatData for generation prompts) of data.eval (a file or sources)."""
    srcs = eval_sources(data_cfg)
    named = isinstance(data_cfg.eval, list) and len(srcs) > 1
    evals, stats, eval_data = {}, None, None
    for s in srcs:
        data, table, st, _ = read_and_encode(s.path, data_cfg, tokenizer, max_len, task, s.fmt)
        evals[s.name if named else ""] = table
        stats = st if stats is None else stats
        if generating and eval_data is None:  # prompts from the first eval source (re-read when it came cached)
            eval_data = data if data is not None else read_limited(s.path, data_cfg, task, s.fmt)
    return evals, stats if len(srcs) == 1 else None, eval_data


def _mixed(data_cfg, seed: int, srcs: list[Source], tables: list, read: list, evals: dict, eval_stats, eval_data,
           max_len: int) -> LMData:
    """The sources end to end, each packed on its own, and the per-epoch mix of their units."""
    from tunelab.data.mixing import ConcatTable, mix_schedule
    from tunelab.data.packing import pack

    train = ConcatTable(tables)
    units, sizes = [], []
    for k, t in enumerate(tables):
        start = int(train.offsets[k])
        own = pack(t.lengths.tolist(), max_len) if data_cfg.packing else [[j] for j in range(len(t))]
        units += [[start + j for j in u] for u in own]
        sizes.append(len(own))
    subset, size, counts = mix_schedule(sizes, [s.weight for s in srcs], seed, data_cfg.mix_sampling)
    total_w = sum(s.weight for s in srcs)
    info = [{"name": s.name, "path": s.path, "weight": s.weight, "share": round(s.weight / total_w, 6),
             "examples": len(t), "units": n, "units_per_epoch": c, "encode_stats": st}
            for s, t, n, c, (_, _, st, _) in zip(srcs, tables, sizes, counts, read)]
    kind = tables[0].kind if tables[0].kind is not None else read[0][1].kind
    train.kind = kind
    stats = {"sources": [i["name"] for i in info]}
    warnings = list(dict.fromkeys(w for _, _, _, ws in read for w in ws))
    return LMData(train, evals, kind, stats, warnings, eval_stats, eval_data, units, subset, size, info)


def prepare_lm_data(*, task: str, model_cfg, data_cfg, replay_data: str | None = None,
                    replay_ratio: float = 0.0) -> list[Path]:
    """Encode every training and eval source into the data cache as setup_causal_lm would, loading
    only the tokenizer and the model's config (not its weights); the cache entries' folders.
    `model_cfg`, `data_cfg`: the model and data sections."""
    from transformers import AutoConfig

    from tunelab.models.gguf import plain_source
    from tunelab.models.load import load_tokenizer
    from tunelab.models.registry import resolve_model
    from tunelab.train.sizes import usable_max_length

    m = model_cfg
    source = plain_source(resolve_model(m.name))
    tokenizer = load_tokenizer(source, trust_remote_code=m.trust_remote_code, revision=m.revision)
    config = AutoConfig.from_pretrained(source.path, trust_remote_code=m.trust_remote_code, revision=m.revision)
    max_len = usable_max_length(m.max_length, config)
    tables = [read_and_encode(s.path, data_cfg, tokenizer, max_len, task, s.fmt)[1]
              for s in train_sources(data_cfg, replay_data, replay_ratio) + eval_sources(data_cfg)]
    return [t.store.folder for t in tables if hasattr(t, "store")]


__all__ = ["read_and_encode", "load_lm_data", "LMData", "split_indices", "split_examples", "prepare_lm_data",
           "train_sources", "eval_sources"]
