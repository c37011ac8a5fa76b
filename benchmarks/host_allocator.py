"""Peak memory and speed of one chat-SFT run per host allocator (train.host_allocator), alternating.

    flock /work/bench.lock .venv/bin/python benchmarks/host_allocator.py --repeats 2 \\
        --set train.weights_dtype=bf16 --set optim.name=adamw_8bit

The run is perf_sft's tunelab side (SmolLM2-135M-Instruct, 160 davinci-003 pairs packed to 512, 4
rows a step, `--steps` steps), each in its own spawned process started on one allocator as `tunelab
train` would start it (LD_PRELOAD), the allocators alternating A B C A B C. Per run: the peak RSS of
each phase (setup, train, save and report; perf_profile.PhaseSampler), tokens/s and the per-step
losses (which must be identical: the allocator changes no number). Allocators the machine lacks
are left out and named. Writes benchmarks/results/host_allocator.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchutil import in_child_on, write_result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def one_run(raw: dict, out: str) -> dict:
    from perf_profile import phases
    from tunelab.host_allocator import in_use
    from tunelab.monitor.metrics_log import read_metrics

    result = phases(raw, out)
    result["losses"] = [r["loss"] for r in read_metrics(Path(out) / "metrics.jsonl") if "loss" in r and "elapsed" in r]
    result["host_allocator"] = in_use()
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--method", choices=["full", "lora"], default="full")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--allocators", nargs="+", default=["glibc", "jemalloc", "tcmalloc"])
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "host_allocator.json")
    a = ap.parse_args()
    from perf_sft import bf16_native, missing_inputs, tunelab_config, write_pairs
    from tunelab.config import library_versions
    from tunelab.host_allocator import find_library

    why = missing_inputs(a.method)
    if why:
        print(f"skipped: {why}")
        return 0
    sides = [n for n in a.allocators if n == "glibc" or find_library(n)]
    result = {"benchmark": "host_allocator", "method": a.method, "steps": a.steps, "overrides": a.overrides,
              "command": "python benchmarks/host_allocator.py " + " ".join(sys.argv[1:]),
              "not_on_this_machine": [n for n in a.allocators if n not in sides],
              "libraries": {n: find_library(n) for n in sides if n != "glibc"},
              "versions": library_versions(), "load_average": [os.getloadavg()[0]], "runs": []}
    with tempfile.TemporaryDirectory(prefix="tunelab-allocator-") as tmp:
        chat, _ = write_pairs(Path(tmp), 160)
        raw = tunelab_config(str(chat), a.steps, a.method, a.overrides, "bf16" if bf16_native() else "fp32")
        for i in range(a.repeats):
            for name in sides:
                run = in_child_on(name, one_run, raw, str(Path(tmp) / f"{name}-{i}"))
                run["side"], run["repeat"] = name, i
                result["runs"].append(run)
                result["load_average"].append(os.getloadavg()[0])
                print(f"{name}: train peak {run['phases']['train']['peak_rss_mb']:.0f} MB, "
                      f"{run['tokens_per_second']:.1f} tokens/s (ran on {run['host_allocator']})", flush=True)
                write_result(a.out, result)
    result["median"] = {}
    for name in sides:
        runs = [r for r in result["runs"] if r["side"] == name]
        result["median"][name] = {
            "train_peak_rss_mb": statistics.median(r["phases"]["train"]["peak_rss_mb"] for r in runs),
            "process_peak_mb": statistics.median(r["process_peak_mb"] for r in runs),
            "after_training_peak_rss_mb": statistics.median(r["phases"]["save_and_report"]["peak_rss_mb"] for r in runs),
            "tokens_per_second": statistics.median(r["tokens_per_second"] for r in runs)}
    first = result["runs"][0]["losses"]
    result["losses_identical"] = all(r["losses"] == first for r in result["runs"])
    write_result(a.out, result)
    print(result["median"], "losses identical:", result["losses_identical"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
