"""fp32 vs bf16 autocast training speed on this CPU: is `train.precision: auto`'s threshold right?

    python benchmarks/precision_cpu.py                    # toy, minilm, smollm2, small (~3 min on 2 idle cores)
    python benchmarks/precision_cpu.py --only toy --only minilm

`train.precision: auto` (src/tunelab/train/precision.py) picks bf16 autocast on a CPU only for
models with at least CPU_BF16_MIN_PARAMS parameters. This measures, in one process, full training
steps (forward + backward + grad clipping + AdamW step, through tunelab's own param_groups,
build_optimizer and autocast_factory) in fp32 and in bf16 autocast for:

  toy      tiny random BERT, hidden 64, 2 blocks (the test fixture size), batch 16 x 64 tokens
  small    random BERT, hidden 256, 4 blocks, batch 16 x 64 tokens
  minilm   the embedded all-MiniLM-L6-v2 classifier (22.7M), batch 16 x 64 tokens
  smollm2  the embedded SmolLM2-135M-Instruct (GGUF converted to a plain causal LM through
           tunelab.models.gguf.plain_source, as training loads it), batch 4 x 256 tokens

Inputs are random token ids (fixed length, no padding). Each precision gets one warm-up step;
then the two precisions alternate in rounds (fp32 then bf16, bf16 then fp32, ...) on the same
model and optimizer, so a burst of load from other processes hits both about equally. Times per
step are reported as the minimum, the median and the mean. On a shared machine, read the minimum:
other processes only ever add time to a step, so the fastest step is the closest to the
uncontended cost, while medians of a few steps still swing with bursts (measured here: a 5.5M
model's median said bf16 is 4x slower while its fastest steps said 2x faster).

Writes benchmarks/results/precision_cpu.json (or `--out`). Skips a model (recorded in the JSON)
whose embedded package is missing.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from benchutil import write_result
from tunelab.config import library_versions

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "precision_cpu.json"

# name -> (batch, seq_len, rounds, steps per round per precision)
PLAN = {
    "toy": (16, 64, 4, 4),
    "minilm": (16, 64, 3, 2),
    "smollm2": (4, 256, 2, 1),
    "small": (16, 64, 3, 2),
}



def _cpu_info() -> dict:
    info = {"cpus": os.cpu_count(), "platform": platform.platform()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), None)
        flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
        info.update({"model": model, "amx_bf16": "amx_bf16" in flags, "avx512_bf16": "avx512_bf16" in flags})
    except OSError:
        pass
    import torch

    info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    info["torch_threads"] = torch.get_num_threads()
    return info


def _tiny_bert(hidden: int, layers: int, heads: int, vocab: int = 8192):
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=4 * hidden, max_position_embeddings=512, num_labels=2)
    return BertForSequenceClassification(cfg)


def build(name: str):
    """(model, make_batch) for one entry of PLAN; make_batch(batch, seq) -> model kwargs."""
    import torch

    if name == "toy":
        model = _tiny_bert(64, 2, 2)
    elif name == "small":
        model = _tiny_bert(256, 4, 4)
    elif name == "minilm":
        from tunelab.models.load import load_classifier
        from tunelab.models.registry import resolve_model

        model = load_classifier(resolve_model("minilm"), ["0", "1"])
    elif name == "smollm2":
        from tunelab.models.gguf import plain_source
        from tunelab.models.load import load_causal_lm
        from tunelab.models.registry import resolve_model

        model = load_causal_lm(plain_source(resolve_model("smollm2-135m-instruct")))
    else:
        raise ValueError(name)
    vocab = model.config.vocab_size
    causal = name == "smollm2"

    def make_batch(batch: int, seq: int, seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(5, vocab, (batch, seq), generator=g)
        out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        out["labels"] = ids.clone() if causal else torch.randint(0, 2, (batch,), generator=g)
        return out

    return model, make_batch


def measure(name: str, batch: int, seq: int, rounds: int, steps: int) -> dict:
    import torch

    from tunelab.models.load import count_params
    from tunelab.train.optim import build_optimizer, param_groups
    from tunelab.train.precision import CPU_BF16_MIN_PARAMS, autocast_factory, resolve_precision

    torch.manual_seed(0)
    model, make_batch = build(name)
    model.train()
    _, n_params = count_params(model)
    optimizer = build_optimizer(param_groups(model, lr=1e-5, weight_decay=0.01))
    device = torch.device("cpu")
    contexts = {p: autocast_factory(p, device) for p in ("fp32", "bf16")}
    data = make_batch(batch, seq, 0)

    def step(precision: str) -> tuple[float, float]:
        t = time.perf_counter()
        with contexts[precision]():
            loss = model(**data).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t, float(loss.detach())

    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    warmup = {p: round(step(p)[0], 3) for p in ("fp32", "bf16")}
    for r in range(rounds):
        order = ("fp32", "bf16") if r % 2 == 0 else ("bf16", "fp32")
        for precision in order:
            for _ in range(steps):
                times[precision].append(step(precision)[0])
    with torch.no_grad():  # how far bf16 autocast moves the loss on the same batch and weights
        model.eval()
        loss32 = float(model(**data).loss)
        with contexts["bf16"]():
            loss16 = float(model(**data).loss)
    med = {p: statistics.median(v) for p, v in times.items()}
    return {
        "model": name, "params": n_params, "batch": batch, "seq_len": seq,
        "steps_timed_per_precision": len(times["fp32"]), "warmup_seconds": warmup,
        "seconds_per_step_median": {p: round(v, 4) for p, v in med.items()},
        "seconds_per_step_mean": {p: round(statistics.fmean(v), 4) for p, v in times.items()},
        "seconds_per_step_all": {p: [round(x, 4) for x in v] for p, v in times.items()},
        "steps_per_second_median": {p: round(1 / v, 3) for p, v in med.items()},
        "seconds_per_step_min": {p: round(min(v), 4) for p, v in times.items()},
        "bf16_speedup_min": round(min(times["fp32"]) / min(times["bf16"]), 3),
        "bf16_speedup_median": round(med["fp32"] / med["bf16"], 3),
        "bf16_speedup_mean": round(statistics.fmean(times["fp32"]) / statistics.fmean(times["bf16"]), 3),
        "eval_loss_fp32": round(loss32, 5), "eval_loss_bf16_autocast": round(loss16, 5),
        "auto_picks": resolve_precision("auto", device, n_params), "auto_threshold_params": CPU_BF16_MIN_PARAMS,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", action="append", choices=sorted(PLAN), default=None)
    p.add_argument("--rounds-scale", type=float, default=1.0, help="multiply each model's rounds (at least 2)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = p.parse_args(argv)

    import torch

    load_before = os.getloadavg()
    results, skipped = [], {}
    t0 = time.monotonic()
    for name in a.only or list(PLAN):
        batch, seq, rounds, steps = PLAN[name]
        rounds = max(2, round(rounds * a.rounds_scale))
        print(f"{name}: batch {batch} x {seq}, {rounds} rounds x {steps} steps per precision ...", flush=True)
        try:
            r = measure(name, batch, seq, rounds, steps)
        except Exception as e:  # an embedded model's package is missing
            if name in ("minilm", "smollm2"):
                skipped[name] = f"{type(e).__name__}: {e}"
                print(f"  skipped: {skipped[name]}", flush=True)
                continue
            raise
        results.append(r)
        m = r["seconds_per_step_min"]
        print(f"  {r['params'] / 1e6:.1f}M params: fastest step fp32 {m['fp32']:.3f} s, bf16 {m['bf16']:.3f} s: "
              f"bf16 speedup {r['bf16_speedup_min']:.2f}x (median {r['bf16_speedup_median']:.2f}x; "
              f"auto picks {r['auto_picks']})", flush=True)

    result = {
        "benchmark": "precision_cpu",
        "command": "python benchmarks/precision_cpu.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "what": "one training step = forward (under autocast for bf16) + backward + clip + AdamW step; fp32 master weights",
        "results": results, "skipped": skipped,
        "total_seconds": round(time.monotonic() - t0, 1),
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "cpu": _cpu_info(), "versions": library_versions(), "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
    }
    write_result(a.out, result)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
