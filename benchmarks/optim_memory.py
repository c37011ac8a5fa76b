"""Peak memory of a full fine-tune of SmolLM2-135M-Instruct with optim.name adamw vs adamw_8bit.

    .venv/bin/python benchmarks/optim_memory.py --steps 4

perf_sft.py's tunelab side (the embedded model, the first --pairs alpaca_eval pairs, packing to 512,
4 rows a step, constant lr, no weight decay) in fp32 (this benchmark's machine may emulate bf16:
benchmarks/perf_sft.py bf16_native), each optimizer in its own spawned process, one after the
other. Per run: the process's max RSS at the end (loading, training, final save and report
included), the summary's train_peak_memory_mb (the training loop's peak), the optimizer state's
bytes read from its tensors after the last step, and the losses. Writes
benchmarks/results/optim_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchutil import in_child, write_result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def one_run(name: str, steps: int, pairs: int) -> dict:
    import torch

    import tunelab.train.loop as loop
    from perf_sft import run_tunelab, tunelab_config, write_pairs

    held = {"bytes": 0}
    step = loop.optimizer_step

    def counted(optimizer, *a, **k):  # the optimizer state's bytes after each step, read from its tensors
        out = step(optimizer, *a, **k)
        tensors = [v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
        tensors += [v for st in optimizer.state.values() for d in st.values() if isinstance(d, dict)
                    for v in d.values() if torch.is_tensor(v)]
        held["bytes"] = max(held["bytes"], sum(t.numel() * t.element_size() for t in tensors))
        return out

    loop.optimizer_step = counted
    with tempfile.TemporaryDirectory() as tmp:
        chat, _ = write_pairs(Path(tmp), pairs)
        raw = tunelab_config(str(chat), steps, "full", [f"optim.name={name}"], precision="fp32")
        result = run_tunelab(raw, str(Path(tmp) / "run"))
    result["optimizer_state_mb"] = held["bytes"] / 2**20
    result["optim"] = name
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--pairs", type=int, default=160)
    args = ap.parse_args()
    from benchutil import alpaca_smollm2_missing
    from perf_sft import DATA

    why = alpaca_smollm2_missing(DATA)
    if why:
        sys.exit(f"cannot run: {why}")
    runs = [in_child(one_run, name, args.steps, args.pairs) for name in ("adamw", "adamw_8bit")]
    import bitsandbytes
    import torch

    a, b = runs
    result = {"benchmark": "optim_memory", "steps": args.steps, "pairs": args.pairs, "precision": "fp32",
              "command": f"python benchmarks/optim_memory.py --steps {args.steps}",
              "runs": runs,
              "saved_mb": {k: round(a[k] - b[k], 1) for k in ("peak_memory_mb", "train_peak_memory_mb",
                                                              "optimizer_state_mb")},
              "max_relative_loss_difference": max(abs(x - y) / y for x, y in zip(b["losses"], a["losses"])),
              "versions": {"torch": torch.__version__, "bitsandbytes": bitsandbytes.__version__,
                           "python": platform.python_version()},
              "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
              "load_average": os.getloadavg(), "cpus": os.cpu_count()}
    write_result(REPO / "benchmarks" / "results" / "optim_memory.json", result)
    print(json.dumps({k: result[k] for k in ("saved_mb", "max_relative_loss_difference")}, indent=1))
    for r in runs:
        print(r["optim"], {k: round(r[k], 1) for k in ("peak_memory_mb", "train_peak_memory_mb", "optimizer_state_mb",
                                                       "seconds")})


if __name__ == "__main__":
    main()
