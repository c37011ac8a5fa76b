"""SST-2 benchmark: tunelab's DEFAULT classification recipe vs the transformers Trainer, side by side.

    python benchmarks/sst2_classification.py                 # 8000 rows, the whole dev file, with the peer
    python benchmarks/sst2_classification.py --rows 4000 --eval-rows 2000   # the quicker comparison
    python benchmarks/sst2_classification.py --no-peer --set optim.head_lr_multiplier=20

Fine-tunes the embedded `minilm` on the first `--rows` rows (default 8000) of
../shared/datasets/sst2/train.tsv (the file is already shuffled: label balance and length profile
of its first rows match the whole file) and scores all 6,735 rows of ../shared/datasets/sst2/dev.tsv
(`--eval-rows N` for the first N only: tunelab evaluates four times per run - before training and
after each epoch - which at ~150 rows/s on these 2 cores costs minutes). The tunelab side builds a Config in code with only data/model keys set, so
it measures the defaults in src/tunelab/config.py; `--set key=value` overrides (as in `tunelab
train --set`) are recorded in the JSON and mark the run as not-the-default.

The peer is `transformers.Trainer` on the same rows, epochs, batch size, tokenizer and max length,
lr 2e-5 and otherwise the Trainer's own defaults (linear schedule, no warmup, no weight decay),
dynamic padding with DataCollatorWithPadding, evaluated on the same dev rows after each epoch.

Each side runs in its own spawned process, so peak memory (max RSS) is that side's alone; tunelab's
starts on the malloc `tunelab train` would start it on (`--host-allocator`, default auto), the Trainer on glibc.
Throughput is given two ways: as each tool reports it (tunelab: summary samples_per_second, which
leaves out evaluation and checkpoint time; Trainer: train_samples_per_second, which includes its
per-epoch evaluations) and training only (tunelab: from metrics.jsonl log intervals that contain no
evaluation; Trainer: train_runtime minus eval_runtime).

Writes benchmarks/results/sst2_classification.json (or `--out`). Skips with exit code 0 and a
message when ../shared/datasets/sst2 or the embedded model is missing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

from benchutil import in_child, in_child_on, sst2_minilm_missing, write_result
from tunelab.config import library_versions

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "sst2"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "sst2_classification.json"
TARGET_ACCURACY = 0.88
PEER_LR = 2e-5


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB



def _eval_file(dev: Path, eval_rows: int | None, tmp: Path) -> Path:
    """The dev file itself, or its first `eval_rows` rows written to a temp TSV (outside the repo)."""
    if not eval_rows:
        return dev
    lines = dev.read_text(encoding="utf-8").splitlines(keepends=True)
    out = tmp / f"dev_first{eval_rows}.tsv"
    out.write_text("".join(lines[: eval_rows + 1]), encoding="utf-8")
    return out


def _train_only_rate(metrics_path: Path) -> float | None:
    """Samples/s over log intervals with no evaluation (or checkpoint save, which follows one) inside."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    samples = seconds = 0.0
    prev, eval_since_prev = None, False
    for r in rows:
        if any(k.startswith("eval_") for k in r):
            eval_since_prev = True
            continue
        if "elapsed" not in r:
            continue
        if prev is not None and not eval_since_prev:
            samples += r["samples"] - prev["samples"]
            seconds += r["elapsed"] - prev["elapsed"]
        prev, eval_since_prev = r, False
    return samples / seconds if seconds else None


# ---------------------------------------------------------------- tunelab side


def run_tunelab(train: str, dev: str, rows: int, overrides: list[str], outdir: str) -> dict:
    """One tunelab run with the default recipe (plus `overrides`); returns what the JSON records."""
    import torch

    from tunelab.config import Config, apply_overrides
    from tunelab.run import run_training

    raw = {
        "task": "classification",
        "model": {"name": "minilm"},
        "data": {"train": train, "eval": dev, "text_column": "sentence", "label_column": "label", "max_rows": rows},
    }
    cfg = Config.model_validate(apply_overrides(raw, list(overrides)))
    start = time.monotonic()
    s = run_training(cfg, outdir, show_progress=False)
    wall = time.monotonic() - start
    metrics = [json.loads(x) for x in (Path(outdir) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    per_epoch = [{"step": r["step"], "epoch": r["epoch"], "accuracy": r["eval_accuracy"], "macro_f1": r["eval_macro_f1"],
                  "loss": r["eval_loss"]} for r in metrics if "eval_accuracy" in r and not r.get("before_training")]
    groups = json.loads((Path(outdir) / "param_groups.json").read_text())
    final = s.get("final") or {}
    return {
        "name": "tunelab",
        "recipe": {
            "optim.lr": cfg.optim.lr, "optim.weight_decay": cfg.optim.weight_decay,
            "optim.head_lr": cfg.optim.head_lr or cfg.optim.lr * cfg.optim.head_lr_multiplier,
            "optim.head_lr_multiplier": cfg.optim.head_lr_multiplier, "optim.layer_lr_decay": cfg.optim.layer_lr_decay,
            "schedule.name": cfg.schedule.name, "schedule.warmup_ratio": cfg.schedule.warmup_ratio,
            "train.epochs": cfg.train.epochs, "train.batch_size": cfg.train.batch_size,
            "train.max_grad_norm": cfg.train.max_grad_norm, "train.precision": s["precision"],
            "train.seed": cfg.train.seed, "model.max_length": cfg.model.max_length,
            "checkpoint.final": cfg.checkpoint.final, "early_stopping.enabled": cfg.early_stopping.enabled,
            "overrides": list(overrides), "param_groups": {g["name"]: g["lr"] for g in groups},
        },
        "status": s["status"],
        "steps": s["steps"],
        "dev_accuracy": final.get("accuracy"),
        "dev_macro_f1": final.get("macro_f1"),
        "final_weights": s.get("final_weights"),
        "dev_accuracy_last_epoch": per_epoch[-1]["accuracy"] if per_epoch else None,
        "dev_accuracy_before_training": (s.get("before") or {}).get("eval_accuracy"),
        "per_epoch": per_epoch,
        "samples_per_second": round(s["samples_per_second"], 2),
        "train_only_samples_per_second": round(_train_only_rate(Path(outdir) / "metrics.jsonl") or 0.0, 2),
        "tokens_per_second": round(s["tokens_per_second"], 1),
        "peak_memory_mb": round(max(s["peak_memory_mb"], _max_rss_mb()), 1),
        "wall_seconds": round(wall, 1),
        "torch_threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------- peer: transformers Trainer


def run_peer(train: str, dev: str, rows: int, epochs: float, batch_size: int, max_length: int, outdir: str) -> dict:
    """transformers.Trainer with its own defaults except lr, on the same rows, epochs and batch size."""
    import csv

    import numpy as np
    import torch
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding,
                              PrinterCallback, Trainer, TrainingArguments)
    from transformers.utils import logging as hf_logging

    from tunelab.evaluate.classification import classification_metrics
    from tunelab.models.registry import resolve_model

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    start = time.monotonic()

    def read(path: str, limit: int | None):
        with open(path, encoding="utf-8", newline="") as f:
            r = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            out = [(row["sentence"], int(row["label"])) for row in r]
        return out[:limit] if limit else out

    path = resolve_model("minilm").path
    tok = AutoTokenizer.from_pretrained(path)

    def encode(pairs):
        enc = tok([t for t, _ in pairs], truncation=True, max_length=max_length)
        return [{**{k: enc[k][i] for k in enc}, "labels": y} for i, (_, y) in enumerate(pairs)]

    train_ds, dev_ds = encode(read(train, rows)), encode(read(dev, None))
    torch.manual_seed(42)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)

    def compute_metrics(p):
        preds = np.argmax(p.predictions, axis=-1).tolist()
        m = classification_metrics(preds, p.label_ids.tolist(), ["0", "1"])
        return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}

    args = TrainingArguments(
        output_dir=outdir, learning_rate=PEER_LR, num_train_epochs=epochs,
        per_device_train_batch_size=batch_size, per_device_eval_batch_size=batch_size * 2,
        eval_strategy="epoch", save_strategy="no", logging_strategy="epoch", report_to="none",
        use_cpu=True, disable_tqdm=True, seed=42,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=dev_ds,
                      data_collator=DataCollatorWithPadding(tok), processing_class=tok, compute_metrics=compute_metrics)
    trainer.remove_callback(PrinterCallback)  # it prints every log dict when tqdm is off
    result = trainer.train()
    evals = [h for h in trainer.state.log_history if "eval_accuracy" in h]
    eval_seconds = sum(h["eval_runtime"] for h in evals)
    runtime = result.metrics["train_runtime"]
    n_samples = len(train_ds) * epochs
    return {
        "name": "transformers.Trainer",
        "args": {"learning_rate": PEER_LR, "num_train_epochs": epochs, "per_device_train_batch_size": batch_size,
                 "lr_scheduler_type": str(args.lr_scheduler_type.value if hasattr(args.lr_scheduler_type, "value") else args.lr_scheduler_type),
                 "warmup_steps": args.warmup_steps, "weight_decay": args.weight_decay, "max_grad_norm": args.max_grad_norm,
                 "max_length": max_length, "collator": "DataCollatorWithPadding", "use_cpu": True, "seed": 42},
        "steps": trainer.state.global_step,
        "dev_accuracy": evals[-1]["eval_accuracy"] if evals else None,
        "dev_macro_f1": evals[-1]["eval_macro_f1"] if evals else None,
        "per_epoch": [{"epoch": h["epoch"], "accuracy": h["eval_accuracy"], "macro_f1": h["eval_macro_f1"],
                       "loss": h["eval_loss"]} for h in evals],
        "samples_per_second": round(result.metrics["train_samples_per_second"], 2),
        "train_only_samples_per_second": round(n_samples / (runtime - eval_seconds), 2) if runtime > eval_seconds else None,
        "peak_memory_mb": round(_max_rss_mb(), 1),
        "wall_seconds": round(time.monotonic() - start, 1),
        "torch_threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with train.tsv and dev.tsv")
    p.add_argument("--rows", type=int, default=8000, help="first N rows of train.tsv (default 8000)")
    p.add_argument("--eval-rows", type=int, default=0, help="first N rows of dev.tsv; 0 = all 6,735 (the default)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="tunelab config override (repeatable); the default recipe when absent")
    p.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the transformers Trainer (default: on)")
    p.add_argument("--host-allocator", choices=("auto", "glibc", "jemalloc", "tcmalloc"), default="auto",
                   help="the malloc tunelab's side starts on, as `tunelab train` would start it (train.host_allocator; "
                   "results before 2026-12-04 ran it on glibc); the Trainer stays on glibc")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = p.parse_args(argv)

    train, dev = a.data / "train.tsv", a.data / "dev.tsv"
    missing = sst2_minilm_missing(a.data)
    if missing:
        print(f"skipped: {missing}")
        return 0

    from tunelab.config import Config, apply_overrides

    probe = Config.model_validate(apply_overrides({"data": {"train": str(train)}}, list(a.overrides)))
    epochs, batch_size, max_length = probe.train.epochs, probe.train.batch_size, probe.model.max_length
    with tempfile.TemporaryDirectory(prefix="tunelab-sst2-") as tmp:
        tmp = Path(tmp)
        dev_used = _eval_file(dev, a.eval_rows, tmp)
        t0, load_start = time.monotonic(), os.getloadavg()
        print(f"tunelab: minilm, {a.rows} rows x {epochs} epochs, batch {batch_size}"
              f"{', overrides ' + ' '.join(a.overrides) if a.overrides else ' (default recipe)'} ...", flush=True)
        ours = in_child_on(a.host_allocator, run_tunelab, str(train), str(dev_used), a.rows, a.overrides,
                           str(tmp / "tunelab-run"))
        print(f"  dev accuracy {ours['dev_accuracy']:.4f}, {ours['samples_per_second']:.1f} samples/s, "
              f"{ours['wall_seconds']:.0f} s", flush=True)
        peer = None
        if a.peer and importlib.util.find_spec("accelerate") is None:
            peer = {"name": "transformers.Trainer", "skipped": "the Trainer needs accelerate: pip install accelerate"}
            print(f"peer skipped: {peer['skipped']}", flush=True)
        elif a.peer:
            print(f"peer: transformers.Trainer, lr {PEER_LR}, same rows/epochs/batch ...", flush=True)
            peer = in_child(run_peer, str(train), str(dev_used), a.rows, epochs, batch_size, max_length,
                             str(tmp / "trainer-run"))
            print(f"  dev accuracy {peer['dev_accuracy']:.4f}, {peer['samples_per_second']:.1f} samples/s, "
                  f"{peer['wall_seconds']:.0f} s", flush=True)
        total = time.monotonic() - t0

    n_dev = sum(1 for _ in dev.open(encoding="utf-8")) - 1
    result = {
        "benchmark": "sst2_classification",
        "command": "python benchmarks/sst2_classification.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "model": "minilm (all-MiniLM-L6-v2, 22.7M params)",
        "train_file": "../shared/datasets/sst2/train.tsv",
        "rows": a.rows,
        "row_selection": "first N rows (the file is pre-shuffled; label share and lengths match the whole file)",
        "eval_file": "../shared/datasets/sst2/dev.tsv",
        "eval_rows": min(a.eval_rows, n_dev) if a.eval_rows else n_dev,
        "eval_selection": f"first {a.eval_rows} rows" if a.eval_rows else "all rows",
        "epochs": epochs,
        "batch_size": batch_size,
        "default_recipe": not a.overrides,
        "tunelab_host_allocator": a.host_allocator,
        "target_dev_accuracy": TARGET_ACCURACY,
        "meets_target": bool(ours["dev_accuracy"] is not None and ours["dev_accuracy"] >= TARGET_ACCURACY),
        "tunelab": ours,
        "peer": peer,
        "total_seconds": round(total, 1),
        "versions": library_versions(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_1min_start_end": [round(load_start[0], 2), round(os.getloadavg()[0], 2)]},
    }
    write_result(a.out, result)
    print(f"wrote {a.out} (target {TARGET_ACCURACY}: {'met' if result['meets_target'] else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
