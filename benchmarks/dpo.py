"""DPO on real preference pairs, tunelab and TRL's DPOTrainer side by side.

    python benchmarks/dpo.py                                    # 600 train / 205 held-out pairs, 1 epoch
    python benchmarks/dpo.py --train 64 --held-out 32 --max-length 256 --sides tunelab-lora,trl-lora

Pairs: alpaca_eval's 805 instructions, answered by GPT-4 (../shared/datasets/alpaca_eval_gpt4,
chosen) and by text-davinci-003 (../shared/datasets/alpaca_eval_davinci003, rejected), shuffled
with seed 0 (the files are grouped by source), the first `--train` for training and the next
`--held-out` for evaluation (pairs whose prompt alone fills `--max-length` are left out first, and
counted: tunelab refuses them as input errors; a longer prompt is cut to its end, see below). 12 of
the 805 instructions give no usable pair (an empty or identical answer), so at most 793 pairs exist:
600 for training leave at most 193 to hold out, not 205. Each side trains the embedded SmolLM2-135M-Instruct with DPO (beta
0.1) on the same pairs, rendered with its chat template, lr 5e-6 (lora: 5e-5) constant, `--batch`
pairs a step, bf16 autocast on the CPU (fp32 master weights; `--precision fp32` on a CPU with no native bf16), one epoch (or `--max-steps`), in its
own spawned process (peak memory = that process's max RSS; tunelab's includes its evaluations and
report, written after the training clock stops, and `train_peak_memory_mb` is its training phase's
alone). tunelab's sides start on the malloc `tunelab train` would start them on
(`--host-allocator`, default auto: train.host_allocator), TRL's on glibc.

Measured per side: tokens trained per second of training (tunelab: summary.json, evaluation time
excluded; TRL: its `num_tokens` over a callback's clock from the first step's start to the last
step's end), peak RSS, and for tunelab the held-out preference accuracy and reward margin before
(the untouched model: margin 0 by construction, since policy = reference) and after, plus the
held-out mean per-token log-probs of chosen and rejected answers. TRL's held-out metrics are
measured after training when `--trl-eval` is given (its evaluate(); off by default: time).

Differences that remain between the sides, by design: tunelab supervises each answer up to its
end-of-turn token, TRL also the newline the template writes after it; tunelab truncates a long
pair by cutting the prompt's beginning (down to max_length // 2) and then the answers' ends, TRL
(keep_start) cuts the end of prompt + answer. Full fine-tuning: tunelab computes the reference
log-probs once before training (stored in the run dir, one model in memory); TRL keeps a second
copy of the model as its reference (its default). Writes benchmarks/results/dpo.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchutil import alpaca_smollm2_missing, in_child, in_child_on, step_clock, write_result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"
CHOSEN = SHARED / "alpaca_eval_gpt4" / "gpt4.model_outputs.json"
REJECTED = SHARED / "alpaca_eval_davinci003" / "text_davinci_003.model_outputs.json"
BETA = 0.1
LR = {"lora": 5e-5, "full": 5e-6}
SIDES = ("tunelab-lora", "tunelab-full", "trl-lora", "trl-full")


def make_pairs(n_train: int, n_held: int, fits=lambda pair: True) -> tuple[list[dict], list[dict], int]:
    """(train, held-out, dropped) pairs of the same instruction: GPT-4's answer chosen, text-davinci-003's
    rejected; `fits(pair)` false drops a pair (a prompt too long for max_length is an input error in tunelab)."""
    good = json.loads(CHOSEN.read_text(encoding="utf-8"))
    bad = {r["instruction"]: r["output"] for r in json.loads(REJECTED.read_text(encoding="utf-8"))}
    pairs = [{"prompt": [{"role": "user", "content": r["instruction"]}],
              "chosen": [{"role": "assistant", "content": r["output"]}],
              "rejected": [{"role": "assistant", "content": bad[r["instruction"]]}]}
             for r in good if r["instruction"] in bad and r["output"].strip() and bad[r["instruction"]].strip()
             and r["output"].strip() != bad[r["instruction"]].strip()]
    random.Random(0).shuffle(pairs)
    kept = [p for p in pairs if fits(p)]
    return kept[:n_train], kept[n_train : n_train + n_held], len(pairs) - len(kept)


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def held_out(metrics: dict | None) -> dict | None:
    if not metrics:
        return None
    return {k: metrics.get(f"eval_{k}", metrics.get(k)) for k in
            ("pref_accuracy", "reward_margin", "reward_chosen", "reward_rejected", "logp_chosen", "logp_rejected",
             "kl_ref", "loss")}


def threads(a: dict) -> None:
    """The side's torch thread count (--threads): the same for both tools; 1 on a box shared with other work."""
    if a["threads"]:
        import torch

        torch.set_num_threads(a["threads"])


def run_tunelab(method: str, train: str, evalf: str, a: dict, out: str) -> dict:
    threads(a)
    from tunelab.config import Config, apply_overrides
    from tunelab.monitor.metrics_log import read_metrics
    from tunelab.run import run_training

    raw = {"task": "preference", "model": {"name": a["model"], "max_length": a["max_length"]},
           "data": {"train": train, "eval": evalf}, "method": method,
           "preference": {"loss": "dpo", "beta": BETA},
           "optim": {"lr": LR[method], "weight_decay": 0.0}, "schedule": {"name": "constant", "warmup_steps": 0},
           "train": {"epochs": 1, "max_steps": a["max_steps"], "batch_size": a["batch"], "log_every": 1,
                     "precision": a["precision"], "eval_before": True, "eval_batch_size": a["batch"]},
           "checkpoint": {"final": "last"}, "early_stopping": {"enabled": False}}
    if method == "lora":
        raw["lora"] = {"r": 16, "alpha": 32, "dropout": 0.0}
    s = run_training(Config.model_validate(apply_overrides(raw, a["overrides"])), out, show_progress=False)
    rows = [r for r in read_metrics(Path(out) / "metrics.jsonl") if "loss" in r]
    return {"name": f"tunelab {method}", "steps": s["steps"], "tokens": s["tokens"], "seconds": s["train_seconds"],
            "tokens_per_second": s["tokens_per_second"], "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_memory_mb": s["peak_memory_mb"], "train_peak_memory_mb": s.get("train_peak_memory_mb"),
            "host_allocator": s.get("host_allocator"), "final_train_loss": rows[-1]["loss"] if rows else None,
            "held_out_before": held_out(s.get("before")), "held_out_after": held_out(s.get("final")),
            "reference": s["data"]["reference"], "encode_stats": s["data"]["encode_stats"],
            "health": s.get("health")}


def run_trl(method: str, model_dir: str, train: str, evalf: str, a: dict, out: str) -> dict:
    threads(a)
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    callback, clock = step_clock()

    cfg = DPOConfig(output_dir=out, num_train_epochs=1, max_steps=a["max_steps"] or -1,
                    per_device_train_batch_size=a["batch"], per_device_eval_batch_size=a["batch"],
                    learning_rate=LR[method], weight_decay=0.0, lr_scheduler_type="constant", warmup_steps=0,
                    beta=BETA, max_length=a["max_length"], bf16=a["precision"] == "bf16", use_cpu=not torch.cuda.is_available(), logging_steps=1,
                    save_strategy="no", report_to="none", dataloader_num_workers=0, seed=0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    peft_config = None
    if method == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    data = load_dataset("json", data_files={"train": train, "eval": evalf})
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=data["train"], eval_dataset=data["eval"],
                         processing_class=tok, peft_config=peft_config, callbacks=[callback])
    trainer.train()
    logs = [r for r in trainer.state.log_history if "num_tokens" in r]
    seconds = clock["end"] - clock["start"]
    result = {"name": f"trl.DPOTrainer {method}", "steps": trainer.state.global_step, "tokens": logs[-1]["num_tokens"],
              "seconds": seconds, "tokens_per_second": logs[-1]["num_tokens"] / seconds,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "final_train_loss": logs[-1].get("loss")}
    if a["trl_eval"]:
        m = trainer.evaluate()
        result["held_out_after"] = {"pref_accuracy": m.get("eval_rewards/accuracies"),
                                    "reward_margin": m.get("eval_rewards/margins"), "loss": m.get("eval_loss")}
    return result


def why_skipped(model: str, sides: list[str]) -> str | None:
    """Why the benchmark cannot run here (a peer's package, the data or the embedded model missing), or None."""
    missing = [m for m in ("trl", "datasets") if importlib.util.find_spec(m) is None]
    if missing and any(s.startswith("trl") for s in sides):
        return f"pip install {' '.join(missing)}"
    if not (CHOSEN.is_file() and REJECTED.is_file()):
        return f"{CHOSEN} or {REJECTED} is missing"
    return alpaca_smollm2_missing(CHOSEN) if model == "smollm2-135m-instruct" else None


def scaled_down(args) -> dict | None:
    """What this run shrank against the issue's work (600 / 205 pairs, max_length 512, one epoch), or None."""
    full = {"train": 600, "held_out": 205, "max_length": 512, "max_steps": None}
    got = {"train": args.train, "held_out": args.held_out, "max_length": args.max_length, "max_steps": args.max_steps}
    return {k: {"issue": full[k], "run": got[k]} for k in full if got[k] != full[k]} or None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=600)
    ap.add_argument("--held-out", type=int, default=205)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, of {', '.join(SIDES)}")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="a chat model folder instead (a smoke test of "
                    "the script with a tiny model)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per side (default torch's own)")
    ap.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="bf16 autocast (fp32 master weights) "
                    "or plain fp32 on both sides: fp32 on a CPU with no native bf16 (AVX2 only), where bf16 is emulated")
    ap.add_argument("--trl-eval", action="store_true", help="also evaluate TRL's sides on the held-out pairs")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "dpo.json")
    ap.add_argument("--note", default=None, help="why this run differs from the defaults (kept in the JSON)")
    ap.add_argument("--host-allocator", choices=("auto", "glibc", "jemalloc", "tcmalloc"), default="auto",
                    help="the malloc tunelab's sides start on, as `tunelab train` would (train.host_allocator; "
                    "TRL's sides stay on glibc)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="a tunelab config override for the tunelab sides, as `tunelab train --set` (repeatable)")
    args = ap.parse_args()
    sides = [s for s in args.sides.split(",") if s]
    if unknown := sorted(set(sides) - set(SIDES)):
        print(f"unknown side(s) {unknown}; choose from {', '.join(SIDES)}")
        return 2
    why = why_skipped(args.model, sides)
    if why:
        print(f"skipped: {why}")
        return 0
    from tunelab.config import library_versions
    from tunelab.models.gguf import plain_source
    from tunelab.models.registry import resolve_model

    model_dir = plain_source(resolve_model(args.model)).path
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)

    def fits(pair: dict) -> bool:  # a prompt that alone fills max_length is an input error in tunelab
        text = tok.apply_chat_template(pair["prompt"], tokenize=False, add_generation_prompt=True)
        return len(tok(text, add_special_tokens=False)["input_ids"]) < args.max_length

    train, held, dropped = make_pairs(args.train, args.held_out, fits)
    a = {"max_length": args.max_length, "batch": args.batch, "max_steps": args.max_steps, "trl_eval": args.trl_eval,
         "threads": args.threads, "model": args.model,
         "precision": args.precision, "overrides": args.overrides}
    results = {}
    result = {"benchmark": "dpo", "model": args.model, "complete": False, "sides": results,
              "scaled_down": scaled_down(args), "note": args.note}
    with tempfile.TemporaryDirectory(prefix="tunelab-dpo-") as tmp:
        tmp = Path(tmp)
        write_jsonl(train, tmp / "train.jsonl")
        write_jsonl(held, tmp / "held_out.jsonl")
        for side in sides:
            tool, method = side.split("-")
            t0 = time.monotonic()
            if tool == "tunelab":
                r = in_child_on(args.host_allocator, run_tunelab, method, str(tmp / "train.jsonl"),
                                str(tmp / "held_out.jsonl"), a, str(tmp / side))
            else:
                r = in_child(run_trl, method, model_dir, str(tmp / "train.jsonl"), str(tmp / "held_out.jsonl"), a,
                             str(tmp / side))
            r["wall_seconds_side"] = round(time.monotonic() - t0, 1)
            results[side] = r
            write_result(args.out, result)  # each side as it ends: an interrupted run keeps what it measured
            after = (r.get("held_out_after") or {}).get("pref_accuracy")
            print(f"{side}: {r['tokens_per_second']:.1f} tokens/s, {r['steps']} steps, peak RSS {r['peak_rss_mb']:.0f} MB"
                  + (f", held-out accuracy after {after:.3f}" if after is not None else ""), flush=True)
    result |= {"complete": True, "pairs": {"train": len(train), "held_out": len(held),
                                            "dropped_long_prompts": dropped}, "max_length": args.max_length,
              "batch_pairs": args.batch, "max_steps": args.max_steps, "beta": BETA, "lr": LR, "threads": args.threads,
              "precision": {"bf16": "bf16 autocast, fp32 master weights", "fp32": "fp32"}[args.precision],
              "sides": results, "tunelab_overrides": args.overrides, "tunelab_host_allocator": args.host_allocator,
              "versions": library_versions() | ({"trl": __import__("trl").__version__} if importlib.util.find_spec("trl") else {}),
              "machine": {"cpus": os.cpu_count(), "load_average_1min_end": round(os.getloadavg()[0], 2)}}
    for method in ("lora", "full"):
        ours, peer = results.get(f"tunelab-{method}"), results.get(f"trl-{method}")
        if ours and peer:
            result[f"speedup_{method}"] = ours["tokens_per_second"] / peer["tokens_per_second"]
    write_result(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
