"""A run's data sources, whatever the task: which files train and evaluate, each one's share of an
epoch, the eval share held out of each, and what summary.json says about them.

`data.train` is one file or a list of sources ({path, weight, name, format}); the list's first
source is the domain data an epoch is one pass over (data.mixing). `regularization.replay_data`
at `replay_ratio` r is the two-source list [train weight 1 - r, replay weight r]. `data.eval` is
one file, a list of sources (each evaluated on its own, eval_<name>_*), or absent: then every
training source except the replay file gives data.eval_split of its rows, held out under its name.

The tasks read and encode a source their own way (tasks.lm_data, tasks.classification_data,
tasks.preference_data); what they share is here: the list, the split, the mix and the summary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Source:
    """One training or eval source: its file (or dataset), record format, weight and name."""

    path: str
    fmt: str | None = None
    weight: float = 1.0
    name: str | None = None
    split: bool = True  # a source of data.train: data.eval_split holds out a share of it (not the replay file)


def train_sources(data, replay_data: str | None = None, replay_ratio: float = 0.0) -> list[Source]:
    """data.train as sources (`data`: the config's data section); the replay file joins at replay_ratio."""
    if isinstance(data.train, list):
        return [Source(s.path, s.format, s.weight, s.label()) for s in data.train]
    if replay_data and replay_ratio > 0:  # replay is the two-source mix [train 1 - r, replay r]
        return [Source(data.train, None, 1 - replay_ratio, Path(data.train).stem),
                Source(replay_data, None, replay_ratio, "replay", split=False)]
    return [Source(data.train)]


def eval_sources(data) -> list[Source]:
    """data.eval as sources: [] when absent (the eval share comes out of the training sources)."""
    if isinstance(data.eval, list):
        return [Source(s.path, s.format, s.weight, s.label()) for s in data.eval]
    return [Source(data.eval)] if data.eval else []


def eval_names(data, srcs: list[Source]) -> list[str]:
    """The name each eval table goes by: '' for the one unnamed eval set (a file, or a single source)."""
    return [s.name for s in srcs] if isinstance(data.eval, list) and len(srcs) > 1 else [""] * len(srcs)


def hold_out(srcs: list[Source], tables: list, split: Callable[[object], tuple[list, list]], has_eval: bool):
    """(training tables, {name: held-out table}, [(source index, held indices)]) after the eval split:
    `split(table) -> (keep, held)` for every source with `split` set, when there is no data.eval.
    One training source gives its held-out rows the name '' (the plain eval set), several their names."""
    if has_eval:
        return list(tables), {}, []
    kept, evals, held_rows = [], {}, []
    named = len(srcs) > 1
    for k, (s, table) in enumerate(zip(srcs, tables)):
        keep, held = split(table) if s.split else (None, [])
        if held:
            evals[s.name if named else ""] = table.subset(held)
            held_rows.append((k, held))
            table = table.subset(keep)
        kept.append(table)
    return kept, evals, held_rows


@dataclass
class Mix:
    """Several training sources as one epoch: `epoch_subset(e)` the units of epoch e (indices into the
    sources' units laid end to end), `epoch_size`, per source `counts` (planned units per epoch), and
    `unit_source` (each unit's source index) for the rows each source actually gave (summary.json)."""

    epoch_subset: Callable[[int], list[int]]
    epoch_size: int
    counts: list[int]
    unit_source: np.ndarray


def mix(srcs: list[Source], units: Sequence[int], seed: int, sampling: str) -> Mix:
    """The per-epoch mix (data.mixing.mix_schedule) of sources holding `units[i]` units each."""
    from tunelab.data.mixing import mix_schedule

    subset, size, counts = mix_schedule(list(units), [s.weight for s in srcs], seed, sampling)
    return Mix(subset, size, counts, np.repeat(np.arange(len(units)), units))


def describe(srcs: list[Source], rows: Sequence[int], units: Sequence[int], plan: Mix, stats: Sequence) -> list[dict]:
    """summary.json's `data.sources`: per source its name, path, weight, share, rows (examples) and
    units (packs or rows) after the eval split, the planned units per epoch and its encode stats.
    The units and rows each source actually gave are added at the end of the run (rows_seen)."""
    total = sum(s.weight for s in srcs)
    return [{"name": s.name, "path": s.path, "weight": s.weight, "share": round(s.weight / total, 6),
             "examples": int(r), "units": int(u), "planned_units_per_epoch": int(c), "encode_stats": st}
            for s, r, u, c, st in zip(srcs, rows, units, plan.counts, stats)]


def with_seen(info: dict, units: list[int], rows: list[int]) -> dict:
    """A task's info with each source's units_seen / rows_seen (the loop's counts, LoopState.source_units /
    source_rows): what the run actually trained on from it, beside what was planned per epoch."""
    if not info.get("sources") or not units:
        return info
    return {**info, "sources": [{**s, "units_seen": u, "rows_seen": r} for s, u, r in zip(info["sources"], units, rows)]}


__all__ = ["Source", "train_sources", "eval_sources", "eval_names", "hold_out", "Mix", "mix", "describe", "with_seen"]
