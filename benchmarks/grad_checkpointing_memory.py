"""Gradient checkpointing: peak memory and step time with and without, side by side.

    python benchmarks/grad_checkpointing_memory.py [--model minilm] [--batch 32] [--length 256] [--steps 3]

Each variant runs in its own spawned process (so max RSS is that variant's alone): the embedded
model through tunelab's own loading path, random tokens, forward + backward + AdamW step. Writes
benchmarks/results/grad_checkpointing_memory.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "grad_checkpointing_memory.json"


def measure(model_name: str, checkpointing: bool, batch: int, length: int, steps: int) -> dict:
    import torch

    from tunelab.models.load import load_classifier
    from tunelab.models.registry import resolve_model
    from tunelab.run import enable_gradient_checkpointing

    torch.manual_seed(0)
    model = load_classifier(resolve_model(model_name), ["a", "b"])
    if checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    x = torch.randint(1000, 20000, (batch, length))
    y = torch.randint(0, 2, (batch,))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        model(input_ids=x, attention_mask=torch.ones_like(x), labels=y).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return {"gradient_checkpointing": checkpointing, "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "rss_after_load_mb": round(rss_before, 1), "step_seconds": [round(t, 3) for t in times]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    runs = []
    for ckpt in (False, True):
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
            runs.append(pool.submit(measure, args.model, ckpt, args.batch, args.length, args.steps).result())
    off, on = runs
    result = {"benchmark": "grad_checkpointing_memory", "command": " ".join(["python"] + sys.argv),
              "model": args.model, "batch": args.batch, "length": args.length, "runs": runs,
              "activation_mb_saved": round(off["peak_rss_mb"] - on["peak_rss_mb"], 1),
              "slowdown": round(min(on["step_seconds"]) / min(off["step_seconds"]), 2)}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
