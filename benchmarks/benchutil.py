"""What the benchmark scripts share: a spawned child per measured side, the results file, the
SST-2 + MiniLM availability check. Imported by scripts run as `python benchmarks/NAME.py` (their
folder is on sys.path)."""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path


def in_child(fn, *args):
    """Run fn(*args) in a fresh spawned process: its peak memory (max RSS) is that side's alone."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def in_child_on(allocator: str, fn, *args):
    """in_child, the child started on `allocator` (train.host_allocator's values) as `tunelab train`
    would start it: LD_PRELOAD set for the spawn when the allocator is not glibc."""
    from tunelab.host_allocator import wanted

    name, path = wanted(allocator)
    saved = os.environ.get("LD_PRELOAD")
    if path:
        os.environ["LD_PRELOAD"] = path
    else:
        os.environ.pop("LD_PRELOAD", None)
    try:
        return in_child(fn, *args)
    finally:
        if saved is None:
            os.environ.pop("LD_PRELOAD", None)
        else:
            os.environ["LD_PRELOAD"] = saved


def write_result(path: Path, result: dict) -> None:
    """The results JSON, written whole or not at all (tmp + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def sst2_minilm_missing(data: Path) -> str | None:
    """Why an SST-2 benchmark with the embedded MiniLM cannot run here, or None."""
    if not ((data / "train.tsv").is_file() and (data / "dev.tsv").is_file()):
        return f"SST-2 not found at {data} (expected train.tsv and dev.tsv; see ../shared/datasets/README.md)"
    try:
        from tunelab.models.registry import resolve_model

        resolve_model("minilm")
    except Exception as e:  # the embedded model's package is missing
        return str(e)
    return None


def write_alpaca_conversations(records: list[dict], path: Path) -> None:
    """alpaca_eval records (instruction -> user turn, output -> assistant turn) as OpenAI chat JSONL."""
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            msgs = [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]
            f.write(json.dumps({"messages": msgs}) + "\n")


def alpaca_smollm2_missing(data: Path) -> str | None:
    """Why an alpaca_eval + SmolLM2 benchmark cannot run here, or None; converts the GGUF once
    (outside any measured process) when it can."""
    if not data.is_file():
        return f"{data} is missing"
    from tunelab.errors import InputError
    from tunelab.models.gguf import plain_source
    from tunelab.models.registry import resolve_model

    try:
        plain_source(resolve_model("smollm2-135m-instruct"))
    except InputError as e:
        return e.one_line()
    return None


def step_clock():
    """(callback, clock) for a transformers Trainer: clock["start"] at the first step's start,
    clock["end"] at the last step's end, so a peer's throughput excludes its setup as tunelab's does."""
    import time

    from transformers import TrainerCallback

    clock: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            clock.setdefault("start", time.monotonic())

        def on_step_end(self, args, state, control, **kw):
            clock["end"] = time.monotonic()

    return Clock(), clock
