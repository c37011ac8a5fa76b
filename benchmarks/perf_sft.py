"""Chat SFT speed and memory vs TRL's SFTTrainer (+ peft), with the CPU's bf16 matmul peak measured alongside.

    flock /work/bench.lock .venv/bin/python benchmarks/perf_sft.py --method full --runs 2
    flock /work/bench.lock .venv/bin/python benchmarks/perf_sft.py --method lora --runs 2
    flock /work/bench.lock .venv/bin/python benchmarks/perf_sft.py --method qlora --runs 2

Both sides: the embedded SmolLM2-135M-Instruct (its converted safetensors folder), the first
`--pairs` instruction/answer pairs of ../shared/datasets/alpaca_eval_davinci003 (data the other
benchmarks do not train on), loss on the assistant tokens only, packing to 512 tokens, 4 rows a
step, bf16 autocast (fp32 master weights on TRL's side; tunelab's defaults on its side), a
constant lr without weight decay or warmup, `--steps` optimizer steps. LoRA/QLoRA: r 8, alpha
16, dropout 0.05 on q,k,v,o,gate,up,down on both sides; QLoRA loads the base as NF4 with double
quantisation (tunelab's nf4_config, given to TRL's model too).

Each run is its own spawned process, the sides alternating A B A B (`--runs` each); a side's
peak memory is its process's max RSS at the end (everything: loading, training, and for tunelab
the final save and report.html, which the summary's peak_memory_mb counts too). Throughput =
tokens trained / seconds from the first step's start to the last step's end (tunelab:
metrics.jsonl `tokens` and `elapsed`; TRL: its `num_tokens` and a callback's clock). Each side's
process starts on the malloc its command would start on: tunelab's on train.host_allocator's (auto:
tcmalloc, else jemalloc, where the machine has them, as `tunelab train` re-executes itself), TRL's on
glibc (`--peer-allocator tcmalloc` to give TRL the same).

Utilisation = model FLOPs per second / the bf16 matmul peak, measured in this script (a child
process with the same threads, the best of several 2048^3 bf16 matmuls) before and after the runs:
full fine-tuning 6 x parameters x tokens/s; LoRA/QLoRA 4 x parameters x tokens/s (forward and the
input gradients through the frozen base; the adapters' own FLOPs are under 1% and not counted).
The loss curves: each side's per-step training loss (mean per supervised token) and their
relative difference per step (the two libraries pack and order the data differently, so the
steps hold different examples; benchmarks/perf_levers.py compares tunelab's levers on identical
batches). Writes benchmarks/results/perf_sft_<method>.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchutil import in_child, in_child_on, step_clock, write_result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "datasets" / "alpaca_eval_davinci003" / "text_davinci_003.model_outputs.json"
MAX_LENGTH, BATCH = 512, 4
LR = {"full": 5e-5, "lora": 2e-4, "qlora": 2e-4}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def missing_inputs(method: str = "full") -> str | None:
    """Why this benchmark cannot run here, or None (converts the GGUF once, outside the measured runs)."""
    need = ["trl", "datasets"] + (["peft"] if method != "full" else []) + (["bitsandbytes"] if method == "qlora" else [])
    missing = [m for m in need if importlib.util.find_spec(m) is None]
    if missing:
        return "pip install " + " ".join(missing)
    from benchutil import alpaca_smollm2_missing

    return alpaca_smollm2_missing(DATA)


def write_pairs(folder: Path, n: int) -> tuple[Path, Path]:
    """(tunelab chat JSONL, TRL prompt/completion JSONL) of the first n usable pairs."""
    from benchutil import write_alpaca_conversations

    records = [r for r in json.loads(DATA.read_text(encoding="utf-8")) if r.get("instruction") and r.get("output")][:n]
    chat, pairs = folder / "train.jsonl", folder / "pairs.jsonl"
    write_alpaca_conversations(records, chat)
    with pairs.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps({"prompt": [{"role": "user", "content": r["instruction"]}],
                                "completion": [{"role": "assistant", "content": r["output"]}]}) + "\n")
    return chat, pairs


def bf16_native() -> bool:
    """Whether this CPU computes bf16 matmuls in hardware (AVX512-BF16 / AMX); without it, oneDNN emulates
    them at a fraction of a GFLOP/s (measured on an AVX2-only EPYC: 0.1-0.2 GFLOP/s against ~10 in fp32)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def tunelab_config(train_path: str, steps: int, method: str = "full", overrides: list[str] | None = None,
                   precision: str = "bf16", batch: int = BATCH) -> dict:
    from tunelab.config import apply_overrides

    raw = {"task": "chat", "method": method, "model": {"name": "smollm2-135m-instruct", "max_length": MAX_LENGTH},
           "data": {"train": train_path, "eval_split": 0, "packing": True},
           "optim": {"lr": LR[method], "weight_decay": 0.0}, "schedule": {"name": "constant", "warmup_steps": 0},
           "train": {"max_steps": steps, "batch_size": batch, "log_every": 1, "precision": precision,
                     "eval_before": False},
           "early_stopping": {"enabled": False}}
    if method != "full":
        raw["lora"] = {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": TARGETS}
    return apply_overrides(raw, overrides) if overrides else raw


def run_tunelab(raw: dict, out: str) -> dict:
    from tunelab.config import Config
    from tunelab.monitor.metrics_log import read_metrics
    from tunelab.run import run_training

    summary = run_training(Config.model_validate(raw), out, show_progress=False)
    rows = [r for r in read_metrics(Path(out) / "metrics.jsonl") if "loss" in r and "elapsed" in r]
    last = rows[-1]
    return {"name": "tunelab", "steps": summary["steps"], "tokens": last["tokens"], "seconds": last["elapsed"],
            "tokens_per_second": last["tokens"] / last["elapsed"],
            "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "summary_peak_memory_mb": summary["peak_memory_mb"],
            "train_peak_memory_mb": summary["train_peak_memory_mb"], "host_allocator": summary.get("host_allocator"),
            "total_params": summary["total_params"], "trainable_params": summary["trainable_params"],
            "losses": [r["loss"] for r in rows]}


def run_trl(method: str, model_dir: str, pairs_path: str, steps: int, out: str, precision: str = "bf16",
            batch: int = BATCH) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(0)
    callback, clock = step_clock()
    cfg = SFTConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=batch, learning_rate=LR[method],
                    weight_decay=0.0, lr_scheduler_type="constant", warmup_steps=0, bf16=precision == "bf16", use_cpu=True,
                    packing=True, max_length=MAX_LENGTH, logging_steps=1, save_strategy="no", report_to="none",
                    dataloader_num_workers=0, seed=0)
    kw, peft_config = {}, None
    if method == "qlora":
        from tunelab.models.quantization import nf4_config

        kw["quantization_config"] = nf4_config()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kw)
    if method != "full":
        from peft import LoraConfig

        peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS, bias="none",
                                 task_type="CAUSAL_LM")
    tok = AutoTokenizer.from_pretrained(model_dir)
    data = load_dataset("json", data_files=pairs_path, split="train")
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok, callbacks=[callback],
                         peft_config=peft_config)
    trainer.train()
    logs = [r for r in trainer.state.log_history if "num_tokens" in r and "loss" in r]
    tokens = logs[-1]["num_tokens"]
    seconds = clock["end"] - clock["start"]
    return {"name": "trl.SFTTrainer" + ("+peft" if method != "full" else ""), "steps": trainer.state.global_step,
            "tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds,
            "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "losses": [r["loss"] for r in logs]}


def matmul_peak(n: int = 1024, repeats: int = 6) -> dict:
    """The best GFLOP/s of n^3 matmuls in bf16 and fp32 with this process's threads (AMX/AVX-512 via oneDNN)."""
    import torch

    out = {"threads": torch.get_num_threads(), "n": n}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
        out[f"{name}_gflops"] = round(2 * n**3 / best / 1e9, 1)
    return out


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def summarize(method: str, ours: list[dict], peers: list[dict], peaks: list[dict]) -> dict:
    peak_bf16 = max(p["bf16_gflops"] for p in peaks)
    peak_fp32 = max(p["fp32_gflops"] for p in peaks)
    n_params = ours[0]["total_params"]
    flops_per_token = (6 if method == "full" else 4) * n_params
    med = {side: {k: median_of(runs, k) for k in ("tokens_per_second", "peak_memory_mb")}
           for side, runs in (("tunelab", ours), ("peer", peers))}
    curve_a = [statistics.median(v) for v in zip(*(r["losses"] for r in ours))]
    curve_b = [statistics.median(v) for v in zip(*(r["losses"] for r in peers))]
    rel = [abs(a - b) / b for a, b in zip(curve_a, curve_b)]
    util = {side: flops_per_token * med[side]["tokens_per_second"] / (peak_bf16 * 1e9) for side in med}
    util_fp32 = {side: flops_per_token * med[side]["tokens_per_second"] / (peak_fp32 * 1e9) for side in med}
    return {
        "median": med,
        "speedup": med["tunelab"]["tokens_per_second"] / med["peer"]["tokens_per_second"],
        "memory_ratio": med["tunelab"]["peak_memory_mb"] / med["peer"]["peak_memory_mb"],
        "utilisation": {"formula": f"{flops_per_token // n_params} x {n_params} params x tokens/s / bf16 peak",
                        "bf16_peak_gflops": peak_bf16, **{k: round(v, 4) for k, v in util.items()},
                        "fp32_peak_gflops": peak_fp32, "of_fp32_peak": {k: round(v, 4) for k, v in util_fp32.items()}},
        "loss_curves": {"tunelab": curve_a, "peer": curve_b, "relative_difference_per_step": rel,
                        "max_relative_difference": max(rel) if rel else None,
                        "mean_loss": {"tunelab": statistics.mean(curve_a), "peer": statistics.mean(curve_b)}},
    }


EXACT = ["train.packed_attention=mask", "train.loss_chunk_tokens=0", "train.recompute_norms=false"]


def levers_vs_exact(ours: list[dict], exact: list[dict]) -> dict:
    """The levers' effect on identical batches: speed and memory ratios, the per-step loss difference."""
    a = [statistics.median(v) for v in zip(*(r["losses"] for r in ours))]
    b = [statistics.median(v) for v in zip(*(r["losses"] for r in exact))]
    return {"speedup": median_of(ours, "tokens_per_second") / median_of(exact, "tokens_per_second"),
            "memory_ratio": median_of(ours, "peak_memory_mb") / median_of(exact, "peak_memory_mb"),
            "train_memory_ratio": median_of(ours, "train_peak_memory_mb") / median_of(exact, "train_peak_memory_mb"),
            "max_relative_loss_difference": max(abs(x - y) / y for x, y in zip(a, b)), "exact_overrides": EXACT}


def report(a, ours, peers, exact, peaks, load, complete: bool) -> dict:
    """The results JSON (also written after each pair of runs, complete: false, so a stopped run leaves its figures)."""
    from tunelab.config import library_versions

    result = {"benchmark": "perf_sft", "complete": complete, "method": a.method, "pairs": a.pairs, "steps": a.steps,
              "batch": a.batch, "max_length": MAX_LENGTH, "lr": LR[a.method], "precision": a.precision,
              "bf16_native": bf16_native(), "overrides": a.overrides, "runs": a.runs,
              "host_allocator": {"tunelab": "see each run's host_allocator", "peer": a.peer_allocator},
              "command": "python benchmarks/perf_sft.py " + " ".join(sys.argv[1:]),
              "tunelab": ours, "peer": peers, "matmul_peak": peaks,
              "versions": library_versions() | {"trl": __import__("trl").__version__},
              "machine": {"cpus": os.cpu_count(), "load_average_1min": load}}
    try:
        result.update(summarize(a.method, ours, peers, peaks))
        if exact:
            result["exact_path"], result["levers_vs_exact"] = exact, levers_vs_exact(ours[: len(exact)], exact)
    except (KeyError, ValueError, ZeroDivisionError, statistics.StatisticsError) as e:  # keep the raw runs
        result["summary_error"] = repr(e)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", choices=["full", "lora", "qlora"], default="full")
    ap.add_argument("--pairs", type=int, default=160)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--runs", type=int, default=2, help="runs per side, alternating A B A B")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="tunelab key=value")
    ap.add_argument("--batch", type=int, default=BATCH, help="packed rows per step, both sides")
    ap.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                    help="both sides; auto: bf16 autocast where the CPU has bf16 hardware, else fp32")
    ap.add_argument("--exact-too", action="store_true", help="a third side: tunelab with every lever off "
                    "(mask attention, plain loss, no recomputed norms) on the same batches, A B C A B C")
    ap.add_argument("--peer-allocator", choices=["glibc", "jemalloc", "tcmalloc"], default="glibc",
                    help="the malloc TRL's processes start on (glibc: as `python` starts; tunelab's side starts on "
                    "what `tunelab train` would pick, train.host_allocator)")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    why = missing_inputs(a.method)
    if why:
        print(f"skipped: {why}")
        return 0
    from tunelab.models.gguf import plain_source
    from tunelab.models.registry import resolve_model

    a.precision = a.precision if a.precision != "auto" else ("bf16" if bf16_native() else "fp32")
    out_path = a.out or REPO / "benchmarks" / "results" / f"perf_sft_{a.method}.json"
    model_dir = plain_source(resolve_model("smollm2-135m-instruct")).path
    load = [os.getloadavg()[0]]
    peaks, ours, peers, exact = [in_child(matmul_peak)], [], [], []
    with tempfile.TemporaryDirectory(prefix="tunelab-perf-sft-") as tmp:
        tmp = Path(tmp)
        chat, pairs = write_pairs(tmp, a.pairs)
        raw = tunelab_config(str(chat), a.steps, a.method, a.overrides, a.precision, a.batch)
        for i in range(a.runs):
            ours.append(in_child_on(raw["train"].get("host_allocator", "auto"), run_tunelab, raw, str(tmp / f"tunelab-{i}")))
            print(f"tunelab {a.method}: {ours[-1]['tokens_per_second']:.1f} tokens/s, "
                  f"{ours[-1]['peak_memory_mb']:.0f} MB", flush=True)
            load.append(os.getloadavg()[0])
            peers.append(in_child_on(a.peer_allocator, run_trl, a.method, model_dir, str(pairs), a.steps, str(tmp / f"trl-{i}"),
                                     a.precision, a.batch))
            print(f"trl {a.method}: {peers[-1]['tokens_per_second']:.1f} tokens/s, "
                  f"{peers[-1]['peak_memory_mb']:.0f} MB", flush=True)
            load.append(os.getloadavg()[0])
            write_result(out_path, report(a, ours, peers, exact, peaks, load, complete=False))
            if a.exact_too:
                exact.append(in_child_on(raw["train"].get("host_allocator", "auto"), run_tunelab, tunelab_config(str(chat), a.steps, a.method, a.overrides + EXACT, a.precision, a.batch),
                                      str(tmp / f"exact-{i}")))
                print(f"tunelab exact path: {exact[-1]['tokens_per_second']:.1f} tokens/s, "
                      f"{exact[-1]['peak_memory_mb']:.0f} MB", flush=True)
                load.append(os.getloadavg()[0])
    peaks.append(in_child(matmul_peak))
    write_result(out_path, report(a, ours, peers, exact, peaks, load, complete=True))
    result = json.loads(out_path.read_text())
    print(f"{a.method}: speedup {result.get('speedup')}, memory {result.get('memory_ratio')}, "
          f"utilisation {result.get('utilisation')}; wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
