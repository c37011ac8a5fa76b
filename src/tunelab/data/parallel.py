"""The first pass made fast: records encoded in chunks, with batched fast-tokenizer calls, in
`num_proc` worker processes, under a progress bar with an ETA.

Each chunk of CHUNK records is rendered through the chat template one by one (templates are
Python/Jinja: that cannot be batched), then tokenized in ONE call of the fast tokenizer (the Rust
side handles the whole list), then masked. Chunks go to a pool of forked workers (the tokenizer is
inherited, never pickled) and come back in order, so the result is the same list, in the same
order, as one process encoding record by record: num_proc changes speed, never the data (it is
left out of the cache key for that reason). A bad record is reported from the worker as the same
InputError naming file, line and field.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from tunelab.errors import InputError

CHUNK = 256
_WORKER: dict = {}  # the encode function of the forked workers (inherited from the parent)


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _run_chunk(chunk: list):
    """A worker's chunk: ("ok", results) or ("error", the InputError's fields) (exceptions with
    keyword-only constructors do not survive pickling back to the parent)."""
    try:
        return "ok", _WORKER["fn"](chunk)
    except InputError as e:
        return "error", {"message": e.message, "file": e.file, "line": e.line, "field": e.field, "where": e.where}


def map_chunks(fn: Callable[[list], list], items: list, num_proc: int = 1, what: str = "encoding") -> list:
    """[fn(chunk) for each chunk of items], concatenated in order; in `num_proc` forked processes
    when num_proc > 1 and there is more than one chunk. Shows a progress bar on a terminal."""
    results: list = []
    chunks = list(_chunks(items, CHUNK))
    with progress_bar(len(items), what) as advance:
        if num_proc <= 1 or len(chunks) < 2 or "fork" not in multiprocessing.get_all_start_methods():
            for chunk in chunks:
                results += fn(chunk)
                advance(len(chunk))
            return results
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the workers are the parallelism
        _WORKER["fn"] = fn
        try:
            with multiprocessing.get_context("fork").Pool(min(num_proc, len(chunks))) as pool:
                for chunk, (status, out) in zip(chunks, pool.imap(_run_chunk, chunks)):
                    if status == "error":
                        raise InputError(out.pop("message"), **out)
                    results += out
                    advance(len(chunk))
        finally:
            _WORKER.clear()
    return results


@contextmanager
def progress_bar(total: int, what: str):
    """advance(n) for a rich progress bar (records done, rate, ETA) on stderr when it is a terminal
    and the job is large enough to wait for; a no-op otherwise (logs, tests, pipes)."""
    if total < 2 * CHUNK or not sys.stderr.isatty() or os.environ.get("TUNELAB_NO_PROGRESS"):
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[rate]} rows/s"), TimeElapsedColumn(), TextColumn("ETA"),
                   TimeRemainingColumn(), console=Console(stderr=True), transient=True)
    start = time.monotonic()
    with bar:
        task = bar.add_task(what, total=total, rate="-")

        def advance(n: int) -> None:
            bar.advance(task, n)
            done = bar.tasks[0].completed
            bar.update(task, rate=f"{done / max(time.monotonic() - start, 1e-9):,.0f}")

        yield advance


__all__ = ["map_chunks", "progress_bar", "CHUNK"]
