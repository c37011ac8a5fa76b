"""Chat SFT recipes on held-out instructions (issue 20, item 4): tunelab's default recipe vs `optim.lr: auto`
vs TRL's SFTTrainer with its own defaults, over seeds, all judged by one evaluator.

    python benchmarks/recipes_chat.py                          # 48 train / 64 held-out conversations, seeds 42 43 44
    python benchmarks/recipes_chat.py --seeds 42 --train 32

Data: alpaca_eval's GPT-4 answers (../shared/datasets/alpaca_eval_gpt4), instruction -> user turn and
output -> assistant turn, shuffled with seed 1; the first `--train` conversations train, the last
`--held-out` are held apart (never seen by training, selection or the lr sweep).

Sides (each a spawned child, 2 torch threads, A B C order within a seed):
- `tunelab_default`: a config with only task (chat), model (the embedded SmolLM2-135M-Instruct),
  data.train and the seed; everything else is tunelab's default (its eval split, lr, schedule,
  packing, assistant-only loss, choice of final/).
- `tunelab_lr_auto`: the same plus `optim.lr: auto` (the range test picks the lr).
- `trl_defaults`: trl.SFTTrainer on the same conversations with SFTConfig's defaults (lr 2e-5,
  linear decay, 3 epochs, batch 8, max_length 1024, no packing, and, its default for the
  conversational format, the loss on every token, prompts included); only output, seed, logging
  and saving are set.

Judge: the held-out assistant-token loss (and token accuracy) of each side's saved model, computed
by `tunelab.evaluate.saved_lm.evaluate_saved_lm` (the chat masks: only the assistant's tokens and
its end-of-turn token count) at max_length 512 for every side and for the untouched model. One
evaluator for all sides, so the comparison does not rest on either tool's own reporting.

Results: benchmarks/results/recipes_chat.json, rewritten after every run (a rerun skips the runs
already there), per run and per side (mean, spread). Skips (exit 0) when the data, the embedded
model or trl is missing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchutil import alpaca_smollm2_missing, in_child, write_alpaca_conversations, write_result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "datasets" / "alpaca_eval_gpt4" / "gpt4.model_outputs.json"
MODEL = "smollm2-135m-instruct"
EVAL_MAX_LENGTH = 512


def held_out_loss(model_dir: str, held_out: str) -> dict:
    """The one judge: assistant-token loss and token accuracy of a saved chat model on the held-out file."""
    from tunelab.config import GenerateEvalConfig
    from tunelab.evaluate.saved_lm import evaluate_saved_lm, resolve_model_dir

    out = evaluate_saved_lm(resolve_model_dir(model_dir), held_out, max_length=EVAL_MAX_LENGTH, batch_size=8,
                            settings=GenerateEvalConfig(n=0))
    return {k: out[k] for k in ("loss", "token_accuracy", "supervised_tokens") if k in out}


def run_tunelab(train: str, held: str, seed: int, lr_auto: bool, out: str) -> dict:
    import torch

    torch.set_num_threads(2)
    from tunelab.config import config_from_dict
    from tunelab.run import run_training

    raw = {"task": "chat", "model": {"name": MODEL}, "data": {"train": train}, "train": {"seed": seed}}
    if lr_auto:
        raw["optim"] = {"lr": "auto"}
    cfg = config_from_dict(raw)
    t0 = time.monotonic()
    s = run_training(cfg, out, show_progress=False)
    wall = time.monotonic() - t0
    lr = s.get("lr_find", {}).get("lr") if isinstance(s.get("lr_find"), dict) else None
    return {"held_out": held_out_loss(out, held), "steps": s["steps"], "train_seconds": s["train_seconds"],
            "wall_seconds": round(wall, 1), "final_weights": s.get("final_weights"),
            "lr": lr or cfg.optim.lr, "lr_find": s.get("lr_find"),
            "defaults": {k: v["value"] for k, v in (s.get("defaults") or {}).items()},
            "recipe": {"epochs": cfg.train.epochs, "batch_size": cfg.train.batch_size,
                       "schedule": cfg.schedule.name, "warmup_ratio": cfg.schedule.warmup_ratio,
                       "final": cfg.checkpoint.final, "max_length": cfg.model.max_length}}


def run_trl(train: str, held: str, seed: int, model_dir: str, out: str) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    from trl import SFTConfig, SFTTrainer

    torch.set_num_threads(2)
    hf_logging.set_verbosity_error()
    cfg = SFTConfig(output_dir=out, seed=seed, use_cpu=True, report_to="none", save_strategy="no",
                    logging_strategy="no", disable_tqdm=True)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=load_dataset("json", data_files=train)["train"],
                         processing_class=tok)
    t0 = time.monotonic()
    trainer.train()
    wall = time.monotonic() - t0
    final = Path(out) / "final"
    trainer.save_model(str(final))
    tok.save_pretrained(str(final))
    return {"held_out": held_out_loss(str(final), held), "steps": trainer.state.global_step,
            "wall_seconds": round(wall, 1),
            "recipe": {"lr": cfg.learning_rate, "schedule": str(cfg.lr_scheduler_type), "epochs": cfg.num_train_epochs,
                       "batch_size": cfg.per_device_train_batch_size, "max_length": cfg.max_length,
                       "packing": cfg.packing, "assistant_only_loss": cfg.assistant_only_loss,
                       "bf16": cfg.bf16}}


def aggregate(runs: list[dict], sides: list[str]) -> dict:
    out = {}
    for side in sides:
        got = [r["held_out"]["loss"] for r in runs if r["side"] == side and "held_out" in r]
        if got:
            out[side] = {"seeds": [r["seed"] for r in runs if r["side"] == side and "held_out" in r],
                         "held_out_loss": {"mean": round(statistics.mean(got), 4),
                                           "std": round(statistics.stdev(got), 4) if len(got) > 1 else None,
                                           "min": round(min(got), 4), "max": round(max(got), 4)}}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", type=int, default=48)
    ap.add_argument("--held-out", type=int, default=64)
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    ap.add_argument("--sides", nargs="+", default=["tunelab_default", "tunelab_lr_auto", "trl_defaults"])
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "recipes_chat.json")
    a = ap.parse_args()
    why = alpaca_smollm2_missing(DATA) or (None if importlib.util.find_spec("trl") else "pip install trl")
    if why:
        print(f"skipped: {why}")
        return 0
    from tunelab.models.gguf import plain_source
    from tunelab.models.registry import resolve_model

    model_dir = str(plain_source(resolve_model(MODEL)).path)
    records = json.loads(DATA.read_text(encoding="utf-8"))
    random.Random(1).shuffle(records)
    train_recs, held_recs = records[: a.train], records[-a.held_out :]
    old = json.loads(a.out.read_text()) if a.out.is_file() else {}
    same = old.get("setup", {}).get("train") == a.train and old.get("setup", {}).get("held_out") == a.held_out
    runs = old.get("runs", []) if same else []
    setup = {"model": MODEL, "train": a.train, "held_out": a.held_out, "eval_max_length": EVAL_MAX_LENGTH,
             "data": "alpaca_eval gpt4 answers, shuffled seed 1: first N train, last M held out",
             "torch_threads": 2, "cpu_count": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="tunelab-recipes-chat-") as tmp:
        tmp = Path(tmp)
        train, held = tmp / "train.jsonl", tmp / "held_out.jsonl"
        write_alpaca_conversations(train_recs, train)
        write_alpaca_conversations(held_recs, held)
        if "untouched" not in old or not same:
            setup["untouched"] = in_child(held_out_loss, model_dir, str(held))
        else:
            setup["untouched"] = old["setup"]["untouched"]
        for seed in a.seeds:
            for side in a.sides:
                if any(r["side"] == side and r["seed"] == seed and "held_out" in r for r in runs):
                    continue
                print(f"seed {seed} {side} ...", flush=True)
                load = os.getloadavg()
                out = str(tmp / f"{side}-{seed}")
                try:
                    if side == "trl_defaults":
                        r = in_child(run_trl, str(train), str(held), seed, model_dir, out)
                    else:
                        r = in_child(run_tunelab, str(train), str(held), seed, side == "tunelab_lr_auto", out)
                except Exception as e:  # one side's failure is recorded, the others still run
                    r = {"error": f"{type(e).__name__}: {e}"}
                runs.append({"side": side, "seed": seed, **r, "loadavg_before": load, "loadavg_after": os.getloadavg()})
                print(f"  {json.dumps({'held_out': r.get('held_out'), 'wall': r.get('wall_seconds'), 'error': r.get('error')})}",
                      flush=True)
                write_result(a.out, {"setup": setup, "runs": runs, "sides": aggregate(runs, a.sides), "complete": False})
    done = all(any(r["side"] == s and r["seed"] == x and "held_out" in r for r in runs) for s in a.sides for x in a.seeds)
    write_result(a.out, {"setup": setup, "runs": runs, "sides": aggregate(runs, a.sides), "complete": done})
    print(json.dumps(aggregate(runs, a.sides)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
