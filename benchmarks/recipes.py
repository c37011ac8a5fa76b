"""Recipes on held-out data over several seeds (issue 20): tunelab's DEFAULT recipe vs the transformers
Trainer's textbook recipe and its best lr, and LoRA by default vs full fine-tuning.

    flock /work/bench.lock .venv/bin/python benchmarks/recipes.py --task sst2 --seeds 42 43 44
    flock /work/bench.lock .venv/bin/python benchmarks/recipes.py --task agnews --rows 2000 --test-rows 1000

Sides (each a spawned child, 2 torch threads, one seed at a time, A B A B order within a seed):
- `tunelab_default`: a config with only task, model (minilm) and data.train (+ the column names):
  everything else is tunelab's default (tunelab/defaults.py), including its own eval split from
  the training rows and its choice of final/. final/ is then scored on the test split.
- `tunelab_lora_default`: the same plus `method: lora` (the LoRA defaults).
- `trainer_lr{X}`: transformers.Trainer, the textbook recipe: lr X, 6% warmup + cosine, weight
  decay 0.01, batch 16, 3 epochs, the last epoch kept, dynamic padding; X in {2e-5 (the textbook
  value), 5e-5, 1e-4}: the Trainer's best lr is the best mean of these on the test split.

Data: SST-2 = the first `--rows` rows of ../shared/datasets/sst2/train.tsv; its test split = the
rows of dev.tsv with at least 15 words (sentence-like: the training rows are mostly short phrases,
which score higher than full sentences; the independent SST-2 test is sentences). AG News = the
headerless ../shared/datasets/agnews/train.tsv, `--test-rows` rows drawn (seed 0) as the test split,
the first `--rows` of the rest for training. The test rows are never seen by training or selection.

Results: benchmarks/results/recipes_{task}.json, rewritten after every run (a rerun skips the runs
already there), with per-run accuracy and macro-F1 on the test split, mean and spread per side, and
the load average. Skips (exit 0) when the data or the embedded model is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchutil import in_child, write_result

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"
TRAINER_LRS = (2e-5, 5e-5, 1e-4)


# ---------------------------------------------------------------- data


def read_tsv(path: Path, header: bool) -> list[tuple[str, str]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = [ln.split("\t") for ln in (lines[1:] if header else lines) if ln.strip()]
    return [(r[0], r[1]) for r in rows]


def write_tsv(path: Path, rows: list[tuple[str, str]], header: str | None) -> Path:
    path.write_text((header + "\n" if header else "") + "".join(f"{t}\t{y}\n" for t, y in rows), encoding="utf-8")
    return path


def task_data(task: str, rows: int, test_rows: int, tmp: Path) -> dict:
    """Train and test TSVs in the task's own format (SST-2 with header, AG News headerless), outside the repo."""
    if task == "sst2":
        train = read_tsv(SHARED / "sst2" / "train.tsv", header=True)[:rows]
        test = [r for r in read_tsv(SHARED / "sst2" / "dev.tsv", header=True) if len(r[0].split()) >= 15]
        head, cols = "sentence\tlabel", {"text_column": "sentence", "label_column": "label"}
        test_desc = f"dev.tsv rows with >= 15 words ({len(test)})"
    else:
        every = read_tsv(SHARED / "agnews" / "train.tsv", header=False)
        idx = list(range(len(every)))
        random.Random(0).shuffle(idx)
        test, train = [every[i] for i in sorted(idx[:test_rows])], [every[i] for i in sorted(idx[test_rows:])][:rows]
        head, cols = None, {}
        test_desc = f"{test_rows} rows of agnews/train.tsv drawn with seed 0, kept apart"
    return {"train": str(write_tsv(tmp / "train.tsv", train, head)), "test": str(write_tsv(tmp / "test.tsv", test, head)),
            "columns": cols, "train_rows": len(train), "test_rows": len(test), "test_split": test_desc,
            "labels": sorted({y for _, y in train})}


# ---------------------------------------------------------------- sides


def run_tunelab(data: dict, seed: int, method: str, outdir: str) -> dict:
    """The default recipe: only task, model and data given (plus the seed and, for LoRA, the method)."""
    import torch

    torch.set_num_threads(2)
    from tunelab.config import config_from_dict
    from tunelab.evaluate.saved_model import evaluate_saved_classifier
    from tunelab.run import run_training

    raw = {"task": "classification", "model": {"name": "minilm"}, "data": {"train": data["train"], **data["columns"]},
           "train": {"seed": seed}}
    if method != "full":
        raw["method"] = method
    cfg = config_from_dict(raw)
    start = time.monotonic()
    s = run_training(cfg, outdir, show_progress=False)
    wall = time.monotonic() - start
    cols = data["columns"] or {"text_column": "text", "label_column": "label"}
    m = evaluate_saved_classifier(Path(outdir) / "final", data["test"], max_length=cfg.model.max_length, **cols)
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "final_weights": s.get("final_weights"),
            "internal_eval_accuracy": (s.get("final") or {}).get("accuracy"), "steps": s["steps"],
            "defaults": {k: v["value"] for k, v in (s.get("defaults") or {}).items()},
            "recipe": {"lr": cfg.optim.lr, "head_lr_multiplier": cfg.optim.head_lr_multiplier,
                       "batch_size": cfg.train.batch_size, "epochs": cfg.train.epochs,
                       "warmup_ratio": cfg.schedule.warmup_ratio, "final": cfg.checkpoint.final,
                       "eval_split": cfg.data.eval_split},
            "train_seconds": s["train_seconds"], "wall_seconds": round(wall, 1)}


def run_trainer(data: dict, seed: int, lr: float, outdir: str) -> dict:
    """transformers.Trainer, the textbook recipe at `lr`; the last epoch is scored on the test split."""
    import numpy as np
    import torch
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding,
                              PrinterCallback, Trainer, TrainingArguments)
    from transformers.utils import logging as hf_logging

    from tunelab.evaluate.classification import classification_metrics
    from tunelab.models.registry import resolve_model

    torch.set_num_threads(2)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    has_header = bool(data["columns"])
    labels = data["labels"]
    path = resolve_model("minilm").path
    tok = AutoTokenizer.from_pretrained(path)

    def encode(file):
        pairs = read_tsv(Path(file), header=has_header)
        enc = tok([t for t, _ in pairs], truncation=True, max_length=128)
        return [{**{k: enc[k][i] for k in enc}, "labels": labels.index(y)} for i, (_, y) in enumerate(pairs)]

    train_ds, test_ds = encode(data["train"]), encode(data["test"])
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(labels))
    args = TrainingArguments(
        output_dir=outdir, learning_rate=lr, num_train_epochs=3, per_device_train_batch_size=16,
        per_device_eval_batch_size=64, warmup_steps=0.06, lr_scheduler_type="cosine", weight_decay=0.01,
        eval_strategy="no", save_strategy="no", logging_strategy="no", report_to="none", use_cpu=True,
        disable_tqdm=True, seed=seed)
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, data_collator=DataCollatorWithPadding(tok),
                      processing_class=tok)
    trainer.remove_callback(PrinterCallback)
    start = time.monotonic()
    trainer.train()
    wall = time.monotonic() - start
    pred = trainer.predict(test_ds)
    m = classification_metrics(np.argmax(pred.predictions, axis=-1).tolist(), pred.label_ids.tolist(), labels)
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "steps": trainer.state.global_step,
            "recipe": {"lr": lr, "warmup_steps": 0.06, "lr_scheduler_type": "cosine", "weight_decay": 0.01,
                       "batch_size": 16, "epochs": 3, "kept": "last epoch"}, "wall_seconds": round(wall, 1)}


SIDES = {"tunelab_default": (run_tunelab, "full"), "tunelab_lora_default": (run_tunelab, "lora"),
         **{f"trainer_lr{lr:g}": (run_trainer, lr) for lr in TRAINER_LRS}}


# ---------------------------------------------------------------- summary


def aggregate(runs: list[dict]) -> dict:
    """Mean and spread (sample std, min, max) of accuracy and macro-F1 per side, and the comparisons."""
    out = {}
    for side in SIDES:
        got = [r for r in runs if r["side"] == side and "accuracy" in r]
        if not got:
            continue
        entry = {"seeds": [r["seed"] for r in got]}
        for k in ("accuracy", "macro_f1"):
            vals = [r[k] for r in got]
            entry[k] = {"mean": round(statistics.mean(vals), 4), "std": round(statistics.stdev(vals), 4) if len(vals) > 1
                        else None, "min": round(min(vals), 4), "max": round(max(vals), 4)}
        out[side] = entry
    trainer = {s: v for s, v in out.items() if s.startswith("trainer_")}
    cmp = {}
    if "tunelab_default" in out and trainer:
        best = max(trainer, key=lambda s: trainer[s]["accuracy"]["mean"])
        d = out["tunelab_default"]["accuracy"]["mean"]
        cmp["trainer_best_lr"] = best
        cmp["default_minus_trainer_best"] = round(d - trainer[best]["accuracy"]["mean"], 4)
        if "trainer_lr2e-05" in trainer:
            cmp["default_minus_textbook"] = round(d - trainer["trainer_lr2e-05"]["accuracy"]["mean"], 4)
    if "tunelab_default" in out and "tunelab_lora_default" in out:
        cmp["lora_minus_full"] = round(out["tunelab_lora_default"]["accuracy"]["mean"]
                                       - out["tunelab_default"]["accuracy"]["mean"], 4)
    return {"sides": out, "comparisons": cmp}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=("sst2", "agnews"), default="sst2")
    p.add_argument("--rows", type=int, default=4000, help="training rows (default 4000)")
    p.add_argument("--test-rows", type=int, default=1000, help="agnews: rows held apart as the test split")
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    p.add_argument("--sides", nargs="+", default=list(SIDES), choices=list(SIDES))
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    out = a.out or ROOT / "benchmarks" / "results" / f"recipes_{a.task}.json"
    need = SHARED / ("sst2/dev.tsv" if a.task == "sst2" else "agnews/train.tsv")
    if not need.is_file():
        print(f"skipped: {need} is missing")
        return 0
    old = json.loads(out.read_text()) if out.is_file() else {}
    same = old.get("setup", {}).get("rows") == a.rows and old.get("setup", {}).get("test_rows_arg") == a.test_rows
    runs = old.get("runs", []) if same else []
    with tempfile.TemporaryDirectory(prefix=f"tunelab-recipes-{a.task}-") as tmp:
        tmp = Path(tmp)
        data = task_data(a.task, a.rows, a.test_rows, tmp)
        setup = {"task": a.task, "model": "minilm", "rows": a.rows, "test_rows_arg": a.test_rows,
                 "train_rows": data["train_rows"], "test_rows": data["test_rows"], "test_split": data["test_split"],
                 "labels": data["labels"], "torch_threads": 2, "cpu_count": os.cpu_count()}
        for seed in a.seeds:
            for side in a.sides:
                if any(r["side"] == side and r["seed"] == seed and "accuracy" in r for r in runs):
                    continue
                fn, arg = SIDES[side]
                print(f"{a.task} seed {seed} {side} ...", flush=True)
                load = os.getloadavg()
                try:
                    r = in_child(fn, data, seed, arg, str(tmp / f"{side}-{seed}"))
                except Exception as e:  # one side's failure is recorded, the others still run
                    r = {"error": f"{type(e).__name__}: {e}"}
                runs.append({"side": side, "seed": seed, **r, "loadavg_before": load, "loadavg_after": os.getloadavg()})
                print(f"  {json.dumps({k: r.get(k) for k in ('accuracy', 'macro_f1', 'wall_seconds', 'error')})}", flush=True)
                write_result(out, {"setup": setup, "runs": runs, **aggregate(runs), "complete": False})
        write_result(out, {"setup": setup, "runs": runs, **aggregate(runs),
                           "complete": all(any(r["side"] == s and r["seed"] == x and "accuracy" in r for r in runs)
                                           for s in a.sides for x in a.seeds)})
    print(json.dumps(aggregate(runs)["comparisons"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
