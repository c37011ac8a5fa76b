"""Which weights final/ ships: the best evaluated checkpoint, the last step, or the untouched base.

A fine-tune can end worse than the model it started from (an lr too high, data that does not
match the evaluation): every evaluation below the one before training. `final: best` then ships
the least-bad step, `last` the last one; either way the run says so (a warning, summary.json's
`worse_than_base`, a report line). `final: best_or_base` ships the base instead: its trainable
weights are kept in checkpoints/base/ from the start (retention and resume look only at step-*
folders), and "beat" means strictly better than the evaluation before training, in the
checkpoint metric's direction.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from safetensors.torch import save_file

from tunelab.errors import InputError
from tunelab.train import checkpoint as ckpt
from tunelab.train.early_stop import BestTracker

BASE = "base"  # checkpoints/base/weights.safetensors: the trainable weights before the first step


def check_best_or_base(final: str, eval_before: bool, evaluates: bool) -> None:
    """best_or_base compares with the evaluation before training: refuse a run that has none."""
    if final == "best_or_base" and not (eval_before and evaluates):
        raise InputError("checkpoint.final: best_or_base compares every evaluation with the one before training; "
                         "set train.eval_before: true and give eval data (or use final: best)", field="checkpoint.final")


def save_base(ckpt_root: Path, model, optimizer) -> Path:
    """Keep the untouched trainable weights (what the optimizer may change), written atomically."""
    folder = ckpt_root / BASE
    tmp = ckpt_root / f".tmp-{BASE}.pid{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(ckpt.trainable_state(model, optimizer), str(tmp / "weights.safetensors"))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def versus_base(tracker: BestTracker, before: dict | None) -> dict | None:
    """The best evaluation against the one before training; None when either is missing."""
    if before is None or tracker.best is None or tracker.metric not in before:
        return None
    base = before[tracker.metric]
    beat = tracker.best > base if tracker.mode == "max" else tracker.best < base
    return {"metric": tracker.metric, "before": base, "best": tracker.best, "best_step": tracker.best_step,
            "worse_than_base": not beat}


def choose_final(final: str, ckpt_root: Path, best_checkpoint: str | None, step: int,
                 vs: dict | None) -> tuple[str, Path]:
    """(summary's `final_weights`, the folder holding those weights). "last" is the weights in memory
    (its folder, the last step's checkpoint, may hold their stored evaluation, or not exist)."""
    if final == "best_or_base" and vs is not None and vs["worse_than_base"] and (ckpt_root / BASE).is_dir():
        return BASE, ckpt_root / BASE
    if final in ("best", "best_or_base") and best_checkpoint and (ckpt_root / best_checkpoint).is_dir():
        return best_checkpoint, ckpt_root / best_checkpoint
    return "last", ckpt_root / ckpt.checkpoint_name(step)


def worse_message(vs: dict, shipped: str) -> str:
    what = "the untouched base model" if shipped == BASE else f"the {shipped} weights"
    hint = "" if shipped == BASE else "; checkpoint.final: best_or_base ships the base in that case"
    return (f"this fine-tune is worse than the model it started from: no evaluation beat the one before training "
            f"({vs['metric']} {vs['before']:.4g} before, best {vs['best']:.4g} at step {vs['best_step']}); "
            f"final/ holds {what}{hint}")
