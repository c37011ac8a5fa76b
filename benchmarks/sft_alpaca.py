"""Chat SFT benchmark: the embedded SmolLM2-135M-Instruct on real instruction/answer pairs.

    python benchmarks/sft_alpaca.py                      # 200 train + 40 held-out conversations, 1 epoch
    python benchmarks/sft_alpaca.py --max-steps 5 --set train.precision=fp32

Converts the first `--train` records of ../shared/datasets/alpaca_eval_gpt4/gpt4.model_outputs.json
(instruction -> user turn, output -> assistant turn) to OpenAI chat JSONL in a temporary folder
(the sentences never enter this repository), holds out the next `--held-out` records, and runs
`tunelab`'s chat recipe (packing, loss on assistant tokens only, `precision: auto`) for one epoch.

Reports held-out assistant-token loss before and after, tokens/s and supervised tokens/s of the
training steps only (from metrics.jsonl: the last logged step's elapsed seconds exclude the final
evaluation), and peak memory (max RSS of the training process, which runs in its own spawned
process after the GGUF is converted in the parent). Writes benchmarks/results/sft_alpaca.json (or
`--out`). Skips with exit code 0 and a message when ../shared/datasets or the model is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from benchutil import alpaca_smollm2_missing, write_alpaca_conversations

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "datasets" / "alpaca_eval_gpt4" / "gpt4.model_outputs.json"


def train_once(raw: dict, out_dir: str) -> dict:
    from tunelab.config import Config
    from tunelab.monitor.metrics_log import read_metrics
    from tunelab.run import run_training

    summary = run_training(Config.model_validate(raw), out_dir, show_progress=False)
    steps = [r for r in read_metrics(Path(out_dir) / "metrics.jsonl") if "loss" in r and "elapsed" in r]
    summary["last_step_row"] = steps[-1] if steps else None
    return summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=200)
    ap.add_argument("--held-out", type=int, default=40)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="key=value, as in tunelab train --set")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "sft_alpaca.json")
    args = ap.parse_args()

    missing = alpaca_smollm2_missing(DATA)
    if missing:
        print(f"skipped: {missing}")
        return 0
    from tunelab.config import apply_overrides, library_versions
    records = [r for r in json.loads(DATA.read_text(encoding="utf-8")) if r.get("instruction") and r.get("output")]
    train, held = records[: args.train], records[args.train : args.train + args.held_out]

    with tempfile.TemporaryDirectory(prefix="tunelab-sft-") as tmp:
        tmp = Path(tmp)
        write_alpaca_conversations(train, tmp / "train.jsonl")
        write_alpaca_conversations(held, tmp / "eval.jsonl")
        raw = {
            "task": "chat",
            "model": {"name": "smollm2-135m-instruct", "max_length": args.max_length},
            "data": {"train": str(tmp / "train.jsonl"), "eval": str(tmp / "eval.jsonl"), "packing": True},
            "optim": {"lr": 5e-5, "weight_decay": 0.0},
            "train": {"epochs": 1, "batch_size": args.batch_size, "log_every": 1, "precision": "auto",
                      "eval_batch_size": args.batch_size, **({"max_steps": args.max_steps} if args.max_steps else {})},
            "early_stopping": {"enabled": False},
        }
        raw = apply_overrides(raw, args.overrides)
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
            s = pool.submit(train_once, raw, str(tmp / "run")).result()

    last = s["last_step_row"] or {}
    seconds = last.get("elapsed") or s["train_seconds"]
    tokens = last.get("tokens", s["tokens"])
    sup_total = s["data"]["train"]["supervised_tokens"]
    sup_share = sup_total / s["data"]["train"]["tokens"]
    result = {
        "benchmark": "sft_alpaca", "model": "smollm2-135m-instruct (GGUF Q4_1, de-quantized to fp32)",
        "train_conversations": len(train), "held_out_conversations": len(held), "config": raw,
        "status": s["status"], "steps": s["steps"], "precision": s["precision"], "packing": True,
        "train_tokens": s["data"]["train"]["tokens"], "train_supervised_tokens": sup_total,
        "supervised_share": s["data"]["train"]["supervised_share"],
        "held_out_loss_before": (s.get("before") or {}).get("eval_loss"),
        "held_out_loss_after": (s.get("final") or {}).get("loss"),
        "held_out_token_accuracy_before": (s.get("before") or {}).get("eval_token_accuracy"),
        "held_out_token_accuracy_after": (s.get("final") or {}).get("token_accuracy"),
        "train_seconds": seconds,
        "tokens_per_second": tokens / seconds if seconds else None,
        "supervised_tokens_per_second": tokens * sup_share / seconds if seconds else None,
        "peak_memory_mb": s["peak_memory_mb"],
        "machine": {"python": platform.python_version(), "cpu_count": os.cpu_count(),
                    "platform": platform.platform(), "load_average_at_end": os.getloadavg()},
        "versions": library_versions(),
        "notes": "tokens/s and supervised tokens/s cover the training steps only (the last logged step's "
                 "elapsed seconds); supervised tokens/s = tokens/s x the training set's supervised share (exact for a "
                 "full epoch, an estimate when --max-steps stops inside one).",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1), encoding="utf-8")
    print(json.dumps({k: result[k] for k in ("held_out_loss_before", "held_out_loss_after", "tokens_per_second",
                                             "supervised_tokens_per_second", "peak_memory_mb")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
