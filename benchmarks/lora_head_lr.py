"""LoRA on a small encoder classifier: which head learning rate (issue 20's "LoRA by default within 1 point of
full fine-tuning"), chosen on a validation split that the recipes benchmark's test split never touches.

    .venv/bin/python benchmarks/lora_head_lr.py --multipliers 1 5 20 --seeds 42 43

Each run: tunelab's default LoRA recipe for `minilm` (only task, model, data, method: lora) on the first
`--rows` rows of ../shared/datasets/sst2/train.tsv, with `optim.head_lr_multiplier` set to each value
(the head's lr = optim.lr x it; the head is new, the adapters start at zero). Scored on the rows of
sst2/dev.tsv with FEWER than 15 words: disjoint from benchmarks/recipes.py's test split (the dev rows
with 15 words or more), so choosing on it does not tune on that test. final/ is whatever the default
keeps. Writes benchmarks/results/lora_head_lr.json (rewritten after every run; a rerun skips done runs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchutil import in_child, write_result  # noqa: E402
from recipes import SHARED, read_tsv, write_tsv  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run(train: str, valid: str, seed: int, multiplier: float, outdir: str) -> dict:
    import torch

    torch.set_num_threads(2)
    from tunelab.config import config_from_dict
    from tunelab.evaluate.saved_model import evaluate_saved_classifier
    from tunelab.run import run_training

    cols = {"text_column": "sentence", "label_column": "label"}
    raw = {"task": "classification", "model": {"name": "minilm"}, "data": {"train": train, **cols},
           "method": "lora", "train": {"seed": seed}, "optim": {"head_lr_multiplier": multiplier}}
    cfg = config_from_dict(raw)
    s = run_training(cfg, outdir, show_progress=False)
    m = evaluate_saved_classifier(Path(outdir) / "final", valid, max_length=cfg.model.max_length, **cols)
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "lr": cfg.optim.lr,
            "final_weights": s.get("final_weights"), "steps": s["steps"], "train_seconds": s["train_seconds"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=4000)
    p.add_argument("--multipliers", type=float, nargs="+", default=[1.0, 5.0, 20.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 43])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "lora_head_lr.json")
    a = p.parse_args()
    if not (SHARED / "sst2" / "dev.tsv").is_file():
        print(f"skipped: {SHARED / 'sst2'} is missing")
        return 0
    old = json.loads(a.out.read_text()) if a.out.is_file() else {}
    runs = old.get("runs", []) if old.get("rows") == a.rows else []
    with tempfile.TemporaryDirectory(prefix="tunelab-lora-head-") as tmp:
        tmp = Path(tmp)
        train = write_tsv(tmp / "train.tsv", read_tsv(SHARED / "sst2" / "train.tsv", header=True)[: a.rows],
                          "sentence\tlabel")
        short = [r for r in read_tsv(SHARED / "sst2" / "dev.tsv", header=True) if len(r[0].split()) < 15]
        valid = write_tsv(tmp / "valid.tsv", short, "sentence\tlabel")
        for seed in a.seeds:
            for mult in a.multipliers:
                if any(r["seed"] == seed and r["head_lr_multiplier"] == mult for r in runs):
                    continue
                r = in_child(run, str(train), str(valid), seed, mult, str(tmp / f"{mult}-{seed}"))
                runs.append({"seed": seed, "head_lr_multiplier": mult, **r})
                print(json.dumps(runs[-1]), flush=True)
                by = {}
                for x in runs:
                    by.setdefault(x["head_lr_multiplier"], []).append(x["accuracy"])
                summary = {str(k): {"mean": round(statistics.mean(v), 4), "n": len(v)} for k, v in sorted(by.items())}
                write_result(a.out, {"benchmark": "lora_head_lr", "rows": a.rows, "valid_rows": len(short),
                                     "valid_split": "sst2/dev.tsv rows with < 15 words", "runs": runs,
                                     "accuracy_by_multiplier": summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
