"""Generation health on a real chat SFT: SmolLM2-135M-Instruct on real short instruction/answer pairs,
a sane recipe and a deliberately bad one, judged by what they generate (issue 16).

    python benchmarks/generation_sft.py            # both recipes, SmolLM2 (minutes; run it on a quiet machine)
    python benchmarks/generation_sft.py --model DIR --prompts 4 --max-new-tokens 8 --out /tmp/x.json  # smoke test

Takes the records of ../shared/datasets/alpaca_eval_gpt4/gpt4.model_outputs.json whose answer is
short (<= 300 characters: the whole answer fits the reply budget, so the stop rate means
something), writes them as OpenAI chat JSONL in a temporary folder (the sentences never enter
this repository: the JSON holds measures and events only), and runs tunelab's chat recipe twice:

- sane: the first 48 pairs, 3 epochs, lr 5e-5 cosine;
- bad: the first 24 pairs, 8 epochs, lr 1e-3 constant (memorise a handful of answers at a lr
  far too high for full fine-tuning).

Both generate for the same 16 held-out prompts (greedy and sampled at T 0.7, seed 0, 64 new
tokens) with the untouched model first and the shipped weights last. Expected: the sane run
raises chrF / ROUGE-L against the held-out reference answers and keeps the stop rate; the bad
run is flagged by the generation health events. Writes benchmarks/results/generation_sft.json;
skips (exit 0, a message) when the data or the embedded model is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

from benchutil import alpaca_smollm2_missing, in_child, write_alpaca_conversations, write_result

from tunelab.monitor.health_generation import GEN_KINDS

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "datasets" / "alpaca_eval_gpt4" / "gpt4.model_outputs.json"
MEASURES = ("stop_rate", "length_mean", "length_ratio", "distinct_2", "cross_similarity", "repeated_4gram_share",
            "loop_rate", "leakage_rate", "chrf", "rouge_l")
RECIPES = {
    "sane": {"train_rows": 48, "optim": {"lr": 5e-5, "weight_decay": 0.0},
             "schedule": {"name": "cosine", "warmup_ratio": 0.1}, "epochs": 3},
    "bad": {"train_rows": 24, "optim": {"lr": 1e-3, "weight_decay": 0.0},
            "schedule": {"name": "constant", "warmup_steps": 0}, "epochs": 8},
}


def train_once(raw: dict, out_dir: str, threads: int | None = None) -> dict:
    if threads:
        import torch

        torch.set_num_threads(threads)
    from tunelab.config import Config
    from tunelab.run import run_training

    return run_training(Config.model_validate(raw), out_dir, show_progress=False)


def side(summary: dict) -> dict:
    """The measures before and after, the loss, and the generation events of one run."""
    gen = summary.get("generation") or {}
    pick = lambda d: {m: {k: (d or {}).get(m, {}).get(k) for k in MEASURES} for m in ("greedy", "sampled")}
    health = summary.get("health") or {}
    return {"status": summary["status"], "steps": summary["steps"],
            "eval_loss_before": (summary.get("before") or {}).get("eval_loss"),
            "eval_loss_after": (summary.get("final") or {}).get("loss"),
            "before": pick(gen.get("before")), "after": pick(gen.get("after")),
            "generation_events": {k: v for k, v in (health.get("counts") or {}).items() if k in GEN_KINDS},
            "all_events": health.get("counts"),
            "event_messages": [m for m in health.get("messages", []) if m["kind"] in GEN_KINDS],
            "train_seconds": summary.get("train_seconds"), "wall_seconds": summary.get("wall_seconds")}


def describe(args, held: list, results: dict, *, complete: bool) -> dict:
    """The results file: the runs so far, what was shrunk against the issue's recipe, the machine."""
    from tunelab.config import library_versions

    shrunk = (args.max_steps, args.max_length, args.prompts, args.max_new_tokens) != (None, 256, 16, 64)
    return {
        "benchmark": "generation_sft", "complete": complete,
        "model": args.model + (" (GGUF Q4_1, de-quantized to fp32)" if args.model == "smollm2-135m-instruct" else ""),
        "data": "alpaca_eval_gpt4 records with answers <= 300 characters; held-out prompts are the last "
                f"{len(held)}, disjoint from both training sets", "held_out_prompts": len(held),
        "max_new_tokens": args.max_new_tokens, "runs": results,
        "shrunk": {"max_steps": args.max_steps, "max_length": args.max_length, "prompts": args.prompts,
                   "max_new_tokens": args.max_new_tokens, "threads": args.threads,
                   "issue_defaults": {"max_steps": None, "max_length": 256, "prompts": 16, "max_new_tokens": 64}}
        if shrunk else None,
        "machine": {"python": platform.python_version(), "cpu_count": os.cpu_count(),
                    "load_average_at_end": os.getloadavg()},
        "versions": library_versions(),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--only", choices=sorted(RECIPES), default=None)
    ap.add_argument("--model", default="smollm2-135m-instruct", help="Another chat model, e.g. to smoke-test the script.")
    ap.add_argument("--max-steps", type=int, default=None, help="cut each recipe to this many optimizer steps "
                    "(recorded: a shrunk run on a busy machine)")
    ap.add_argument("--max-length", type=int, default=256, help="model.max_length (rows are packed to it)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads of each run (default torch's own)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "generation_sft.json")
    args = ap.parse_args()
    missing = alpaca_smollm2_missing(DATA)
    if missing:
        print(f"skipped: {missing}")
        return 0
    records = [r for r in json.loads(DATA.read_text(encoding="utf-8"))
               if r.get("instruction") and r.get("output") and len(r["output"]) <= 300 and len(r["instruction"]) <= 300]
    held = records[-args.prompts:]
    results = {}
    with tempfile.TemporaryDirectory(prefix="tunelab-gen-") as tmp:
        tmp = Path(tmp)
        write_alpaca_conversations(held, tmp / "eval.jsonl")
        for name, recipe in RECIPES.items():
            if args.only and name != args.only:
                continue
            write_alpaca_conversations(records[: recipe["train_rows"]], tmp / f"train_{name}.jsonl")
            raw = {"task": "chat", "model": {"name": args.model, "max_length": args.max_length},
                   "data": {"train": str(tmp / f"train_{name}.jsonl"), "eval": str(tmp / "eval.jsonl")},
                   "optim": recipe["optim"], "schedule": recipe["schedule"],
                   "train": {"epochs": recipe["epochs"], "max_steps": args.max_steps, "batch_size": 4, "log_every": 1,
                             "precision": "auto"},
                   "checkpoint": {"final": "last"}, "early_stopping": {"enabled": False},
                   "eval": {"generate": {"n": args.prompts, "max_new_tokens": args.max_new_tokens, "batch_size": 8}}}
            results[name] = {"train_conversations": recipe["train_rows"], "config": raw,
                             **side(in_child(train_once, raw, str(tmp / f"run_{name}"), args.threads))}
            write_result(args.out, describe(args, held, results, complete=False))  # each run as it ends
    result = describe(args, held, results, complete=True)
    write_result(args.out, result)
    for name, r in results.items():
        g0, g1 = r["before"]["greedy"], r["after"]["greedy"]
        print(f"{name}: chrF {g0['chrf']} -> {g1['chrf']}, ROUGE-L {g0['rouge_l']} -> {g1['rouge_l']}, "
              f"stop rate {g0['stop_rate']} -> {g1['stop_rate']}, events {r['generation_events']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
