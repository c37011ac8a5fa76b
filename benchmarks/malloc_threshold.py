"""Peak memory and step time of a training process with glibc's dynamic mmap threshold vs a fixed one
(`train.malloc_mmap_threshold`, tunelab/host_malloc.py): the measurement behind its default.

    flock /work/bench.lock .venv/bin/python benchmarks/malloc_threshold.py --steps 6 --repeats 2

perf_sft.py's tunelab side (SmolLM2-135M-Instruct full fine-tune, the first --pairs alpaca_eval pairs,
packing to 512, 4 rows a step) in fp32 (bf16 is emulated on an AVX2-only CPU) and, with --lora, the
LoRA side too; each run a spawned child, sides alternating A B C A B C. Per run: the child's max RSS at
the end (load, training, final save and report), the training loop's peak, the median seconds per
step after the first, and the losses (the setting must not change them). Writes
benchmarks/results/malloc_threshold.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchutil import in_child, write_result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SIDES = {"glibc_dynamic": None, "fixed_128k": 131072, "fixed_4m": 4 << 20}


def one_run(method: str, threshold: int | None, steps: int, pairs: int) -> dict:
    import torch

    torch.set_num_threads(2)
    from tunelab.monitor.metrics_log import read_metrics
    from perf_sft import run_tunelab, tunelab_config, write_pairs

    with tempfile.TemporaryDirectory() as tmp:
        chat, _ = write_pairs(Path(tmp), pairs)
        raw = tunelab_config(str(chat), steps, method, precision="fp32")
        raw["train"]["malloc_mmap_threshold"] = threshold
        result = run_tunelab(raw, str(Path(tmp) / "run"))
        elapsed = [r["elapsed"] for r in read_metrics(Path(tmp) / "run" / "metrics.jsonl") if "elapsed" in r and "loss" in r]
    result["step_seconds"] = statistics.median(b - a for a, b in zip(elapsed[:-1], elapsed[1:]))
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--pairs", type=int, default=160)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--lora", action="store_true", help="also the LoRA side")
    args = ap.parse_args()
    from benchutil import alpaca_smollm2_missing
    from perf_sft import DATA

    why = alpaca_smollm2_missing(DATA)
    if why:
        sys.exit(f"cannot run: {why}")
    if os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        sys.exit("unset MALLOC_MMAP_THRESHOLD_: it would override both sides")
    out = REPO / "benchmarks" / "results" / "malloc_threshold.json"
    runs = []
    for method in ("full", "lora") if args.lora else ("full",):
        for rep in range(args.repeats):
            for side, threshold in SIDES.items():
                r = in_child(one_run, method, threshold, args.steps, args.pairs)
                runs.append({"method": method, "side": side, "threshold": threshold, "repeat": rep,
                             **{k: r[k] for k in ("peak_memory_mb", "train_peak_memory_mb", "step_seconds", "losses",
                                                  "tokens_per_second")}})
                print(json.dumps({k: v for k, v in runs[-1].items() if k != "losses"}), flush=True)
        summary = {}
        for method in {r["method"] for r in runs}:
            for side in SIDES:
                got = [r for r in runs if r["method"] == method and r["side"] == side]
                if got:
                    summary[f"{method}/{side}"] = {k: round(statistics.median(r[k] for r in got), 3)
                                                   for k in ("peak_memory_mb", "train_peak_memory_mb", "step_seconds")}
        same = all(r["losses"] == runs[0]["losses"] for r in runs if r["method"] == runs[0]["method"])
        import torch

        write_result(out, {"benchmark": "malloc_threshold", "steps": args.steps, "pairs": args.pairs,
                           "precision": "fp32", "command": "python benchmarks/malloc_threshold.py "
                           f"--steps {args.steps} --repeats {args.repeats}" + (" --lora" if args.lora else ""),
                           "runs": runs, "median": summary, "losses_identical": same,
                           "versions": {"torch": torch.__version__, "python": platform.python_version(),
                                        "glibc": platform.libc_ver()[1]},
                           "load_average": os.getloadavg(), "cpus": os.cpu_count()})
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
