"""Forgetting guards on SST-2 (issue 4): does L2-SP or layer-wise lr decay keep MiniLM's embeddings?

    python benchmarks/forgetting_sst2.py                          # 2000 rows: ~10 min on 2 idle cores
    python benchmarks/forgetting_sst2.py --rows 320 --eval-rows 200 --probe-rows 100 --l2sp 1 --l2sp 0.1
                                    # what results/forgetting_sst2.json holds (the cores were shared)

Fine-tunes the embedded `minilm` (a sentence encoder) on the first `--rows` rows of
../shared/datasets/sst2/train.tsv for `--epochs` epoch(s) and scores the first `--eval-rows` rows
of dev.tsv. The runs, all with the same rows, seed, batch size and schedule:

  (d) reference:  the default recipe at its normal lr (2e-5)
  (a) high_lr:    full fine-tune at a deliberately high lr (`--high-lr`, default 3e-4)
  (b) l2sp_<w>:   (a) plus the L2-SP penalty toward the pre-trained weights, one run per `--l2sp`
  (c) llrd_<f>:   (a) with layer-wise lr decay `--llrd` (top block at the high lr, each block below
                  times the factor, embeddings lowest)

The forgetting probe (`probe.data`) is held-out text that is not sentiment data: the first
`--probe-rows` instructions of ../shared/datasets/alpaca_eval_gpt4/gpt4.model_outputs.json, written
to a temporary JSONL at run time (never into the repo). tunelab embeds them with the backbone
before and after fine-tuning (mean-pooled last hidden state, the way sentence-transformers uses
MiniLM) and reports the cosine between the two embeddings of each text: 1.0 = unchanged. A
second, stricter view of the same embeddings is added here: how well the fine-tuned model keeps
the pre-trained model's neighbour structure (retrieval agreement: share of texts whose nearest
neighbour among the probe texts is the same before and after).

Writes benchmarks/results/forgetting_sst2.json (or `--out`). Skips with exit code 0 and a message
when ../shared/datasets/sst2, the probe source or the embedded model is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from benchutil import sst2_minilm_missing, write_result
from tunelab.config import library_versions

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"
DEFAULT_DATA = DATASETS / "sst2"
DEFAULT_PROBE = DATASETS / "alpaca_eval_gpt4" / "gpt4.model_outputs.json"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "forgetting_sst2.json"



def _first_rows_tsv(src: Path, n: int, dst: Path) -> Path:
    lines = src.read_text(encoding="utf-8").splitlines(keepends=True)
    dst.write_text("".join(lines[: n + 1]), encoding="utf-8")
    return dst


def _probe_file(src: Path, n: int, dst: Path) -> Path:
    records = json.loads(src.read_text(encoding="utf-8"))
    texts = [r["instruction"].strip() for r in records if str(r.get("instruction") or "").strip()][:n]
    dst.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return dst


def _neighbour_agreement(model, tokenizer, texts: list[str], before, max_length: int) -> float:
    """Share of probe texts whose nearest other probe text is the same before and after fine-tuning."""
    import torch

    from tunelab.evaluate.probe import probe_measures

    after = probe_measures(model, tokenizer, texts, max_length)["embeddings"]

    def nearest(e):
        sim = e @ e.T
        sim.fill_diagonal_(-2.0)
        return sim.argmax(-1)

    return float((nearest(before) == nearest(after)).float().mean())


def run_one(name: str, train: Path, dev: Path, probe: Path, rows: int, epochs: float, overrides: dict,
            outdir: Path, probe_rows: int) -> dict:
    import torch

    from tunelab.config import Config
    from tunelab.evaluate.probe import probe_measures, read_probe_texts
    from tunelab.models.saved import load_saved_classifier
    from tunelab.run import run_training

    raw = {
        "task": "classification",
        "model": {"name": "minilm"},
        "data": {"train": str(train), "eval": str(dev), "text_column": "sentence", "label_column": "label",
                 "max_rows": rows},
        "train": {"epochs": epochs, "eval_before": False},
        "probe": {"data": str(probe), "max_rows": probe_rows},
    }
    for key, value in overrides.items():
        section, field = key.split(".")
        raw.setdefault(section, {})[field] = value
    cfg = Config.model_validate(raw)
    start = time.monotonic()
    s = run_training(cfg, outdir, show_progress=False)
    wall = time.monotonic() - start

    # Neighbour agreement needs the pre-trained embeddings: recompute them from the untouched model.
    from transformers import AutoModel

    from tunelab.models.registry import resolve_model

    texts = read_probe_texts(probe, "text", probe_rows)
    base = AutoModel.from_pretrained(resolve_model("minilm").path)
    model, tokenizer = load_saved_classifier(outdir / "final")[:2]
    before = probe_measures(base, tokenizer, texts, cfg.model.max_length)["embeddings"]
    agreement = _neighbour_agreement(model, tokenizer, texts, before, cfg.model.max_length)
    del base, model
    groups = json.loads((outdir / "param_groups.json").read_text())
    final, probe_out = s.get("final") or {}, s.get("probe") or {}
    return {
        "run": name,
        "overrides": overrides,
        "param_group_lrs": {g["name"]: g["lr"] for g in groups},
        "status": s["status"],
        "steps": s["steps"],
        "dev_accuracy": final.get("accuracy"),
        "dev_macro_f1": final.get("macro_f1"),
        "probe_embedding_cosine_mean": probe_out.get("embedding_cosine_mean"),
        "probe_embedding_cosine_min": probe_out.get("embedding_cosine_min"),
        "probe_neighbour_agreement": round(agreement, 4),
        "probe_forgetting_flag": probe_out.get("forgetting_flag"),
        "probe_message": probe_out.get("message"),
        "samples_per_second": round(s["samples_per_second"], 2),
        "wall_seconds": round(wall, 1),
        "torch_threads": torch.get_num_threads(),
    }


def _write(a, argv, results: list[dict], t0: float, dev: Path, partial: bool) -> None:
    """Write the JSON after every run, so a stopped benchmark still leaves the runs it finished."""
    n_dev = sum(1 for _ in dev.open(encoding="utf-8")) - 1
    result = {
        "benchmark": "forgetting_sst2",
        "command": "python benchmarks/forgetting_sst2.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "model": "minilm (all-MiniLM-L6-v2, 22.7M params)",
        "train_file": "../shared/datasets/sst2/train.tsv", "rows": a.rows, "epochs": a.epochs,
        "eval_file": "../shared/datasets/sst2/dev.tsv", "eval_rows": min(a.eval_rows, n_dev),
        "eval_selection": f"first {a.eval_rows} rows",
        "probe": {"source": "../shared/datasets/alpaca_eval_gpt4/gpt4.model_outputs.json (instruction field)",
                  "rows": a.probe_rows, "selection": "first N instructions",
                  "measure": "cosine between pre-trained and fine-tuned mean-pooled backbone embeddings per text; "
                             "neighbour agreement = share of texts whose nearest probe neighbour is unchanged"},
        "common": {"batch_size": 16, "schedule": "cosine, 6% warmup", "weight_decay": 0.01, "max_grad_norm": 1.0,
                   "seed": 42, "precision": "fp32", "max_length": 128},
        "runs": results,
        "partial": partial,
        "total_seconds": round(time.monotonic() - t0, 1),
        "versions": library_versions(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_at_end": os.getloadavg()},
    }
    write_result(a.out, result)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with train.tsv and dev.tsv")
    p.add_argument("--probe-source", type=Path, default=DEFAULT_PROBE, help="alpaca_eval JSON (instructions)")
    p.add_argument("--rows", type=int, default=2000, help="first N rows of train.tsv")
    p.add_argument("--eval-rows", type=int, default=872, help="first N rows of dev.tsv")
    p.add_argument("--probe-rows", type=int, default=200)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--ref-lr", type=float, default=2e-5, help="lr of the reference run (d): the default recipe's")
    p.add_argument("--high-lr", type=float, default=3e-4)
    p.add_argument("--l2sp", type=float, action="append", default=None, help="L2-SP weight (repeatable)")
    p.add_argument("--llrd", type=float, default=0.7, help="layer-wise lr decay factor for run (c)")
    p.add_argument("--only", action="append", default=None, help="run only these run names (repeatable)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = p.parse_args(argv)
    l2sp_weights = a.l2sp or [1.0, 0.1, 10.0]

    train, dev = a.data / "train.tsv", a.data / "dev.tsv"
    missing = sst2_minilm_missing(a.data)
    if missing:
        print(f"skipped: {missing}")
        return 0
    if not a.probe_source.is_file():
        print(f"skipped: probe source not found at {a.probe_source}")
        return 0

    runs = [("reference_default_lr", {"optim.lr": a.ref_lr}),
            ("high_lr", {"optim.lr": a.high_lr})]
    l2sp_runs = [(f"high_lr+l2sp_{w:g}", {"optim.lr": a.high_lr, "regularization.l2sp": w}) for w in l2sp_weights]
    # the first L2-SP weight, then LLRD, then the other weights: a stopped run still has one of each guard
    runs += l2sp_runs[:1] + [(f"high_lr+llrd_{a.llrd:g}", {"optim.lr": a.high_lr, "optim.layer_lr_decay": a.llrd})]
    runs += l2sp_runs[1:]
    if a.only:
        runs = [r for r in runs if r[0] in a.only]

    results = []
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tunelab-forget-") as tmp:
        tmp = Path(tmp)
        dev_used = _first_rows_tsv(dev, a.eval_rows, tmp / "dev.tsv")
        probe = _probe_file(a.probe_source, a.probe_rows, tmp / "probe.jsonl")
        for name, overrides in runs:
            print(f"{name}: {overrides} ...", flush=True)
            r = run_one(name, train, dev_used, probe, a.rows, a.epochs, overrides, tmp / name, a.probe_rows)
            results.append(r)
            _write(a, argv, results, t0, dev, partial=len(results) < len(runs))
            print(f"  acc {r['dev_accuracy']:.4f} f1 {r['dev_macro_f1']:.4f} probe cos mean "
                  f"{r['probe_embedding_cosine_mean']:.4f} min {r['probe_embedding_cosine_min']:.4f} "
                  f"nn-agree {r['probe_neighbour_agreement']:.3f} {r['samples_per_second']:.1f} samples/s "
                  f"{r['wall_seconds']:.0f} s", flush=True)

    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
