"""Chat SFT speed, side by side: tunelab's chat recipe vs TRL's SFTTrainer on the same data.

    python benchmarks/sft_vs_trl.py                  # 200 alpaca_eval conversations, 10 steps each
    python benchmarks/sft_vs_trl.py --max-steps 20

Both sides: the embedded SmolLM2-135M-Instruct (its converted safetensors folder), the first
`--train` records of ../shared/datasets/alpaca_eval_gpt4 as user/assistant pairs, loss on the
assistant tokens only, packing to 512 tokens, 4 rows per step, lr 5e-5 without weight decay or
warmup, bf16 autocast on the CPU (fp32 master weights), `--max-steps` optimizer steps, each side in
its own spawned process (peak memory = that process's max RSS). TRL gets the conversations as
conversational prompt/completion pairs (its completion-only loss; SmolLM2's template has no
generation markers for `assistant_only_loss`) and `use_cpu=True`, no evaluation, no saving.

Throughput = tokens trained / seconds from the start of the first step to the end of the last
(tunelab: metrics.jsonl `tokens` and `elapsed` at the last step; TRL: `num_tokens` of its log and
a callback's clock). Needs `trl` and `datasets` (`pip install -e '.[bench]'`); skips with a message
when they, the data or the model are missing. Writes benchmarks/results/sft_vs_trl.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchutil import in_child, step_clock, write_alpaca_conversations, write_result  # noqa: E402
from sft_alpaca import DATA, REPO, train_once  # noqa: E402

LR, MAX_LENGTH, BATCH = 5e-5, 512, 4


def run_tunelab(train_path: str, steps: int, out: str) -> dict:
    raw = {"task": "chat", "model": {"name": "smollm2-135m-instruct", "max_length": MAX_LENGTH},
           "data": {"train": train_path, "eval_split": 0, "packing": True},
           "optim": {"lr": LR, "weight_decay": 0.0}, "schedule": {"name": "constant", "warmup_steps": 0},
           "train": {"max_steps": steps, "batch_size": BATCH, "log_every": 1, "precision": "bf16",
                     "eval_before": False},
           "early_stopping": {"enabled": False}}
    s = train_once(raw, out)
    last = s["last_step_row"]
    return {"name": "tunelab", "steps": s["steps"], "tokens": last["tokens"], "seconds": last["elapsed"],
            "tokens_per_second": last["tokens"] / last["elapsed"], "peak_memory_mb": s["peak_memory_mb"],
            "final_train_loss": last["loss"]}


def run_trl(model_dir: str, pairs_path: str, steps: int, out: str) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(0)
    callback, clock = step_clock()

    cfg = SFTConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=BATCH, learning_rate=LR,
                    weight_decay=0.0, lr_scheduler_type="constant", warmup_steps=0, bf16=True, use_cpu=True,
                    packing=True, max_length=MAX_LENGTH, logging_steps=1, save_strategy="no", report_to="none",
                    dataloader_num_workers=0, seed=0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    data = load_dataset("json", data_files=pairs_path, split="train")
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok, callbacks=[callback])
    trainer.train()
    logs = [r for r in trainer.state.log_history if "num_tokens" in r]
    tokens = logs[-1]["num_tokens"]
    # the clock starts at the first step's beginning; tunelab's elapsed starts at its loop's start
    seconds = clock["end"] - clock["start"]
    return {"name": "trl.SFTTrainer", "steps": trainer.state.global_step, "tokens": tokens, "seconds": seconds,
            "tokens_per_second": tokens / seconds, "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "final_train_loss": logs[-1].get("loss")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=200)
    ap.add_argument("--max-steps", type=int, default=10)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "sft_vs_trl.json")
    a = ap.parse_args()
    missing = [m for m in ("trl", "datasets") if importlib.util.find_spec(m) is None]
    if missing or not DATA.is_file():
        print(f"skipped: {'pip install ' + ' '.join(missing) if missing else str(DATA) + ' is missing'}")
        return 0
    from tunelab.config import library_versions
    from tunelab.models.gguf import plain_source
    from tunelab.models.registry import resolve_model

    model_dir = plain_source(resolve_model("smollm2-135m-instruct")).path
    records = [r for r in json.loads(DATA.read_text(encoding="utf-8")) if r.get("instruction") and r.get("output")]
    records = records[: a.train]
    with tempfile.TemporaryDirectory(prefix="tunelab-sft-trl-") as tmp:
        tmp = Path(tmp)
        write_alpaca_conversations(records, tmp / "train.jsonl")
        with (tmp / "pairs.jsonl").open("w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps({"prompt": [{"role": "user", "content": r["instruction"]}],
                                    "completion": [{"role": "assistant", "content": r["output"]}]}) + "\n")
        ours = in_child(run_tunelab, str(tmp / "train.jsonl"), a.max_steps, str(tmp / "tunelab-run"))
        print(f"tunelab: {ours['tokens_per_second']:.1f} tokens/s over {ours['steps']} steps", flush=True)
        peer = in_child(run_trl, model_dir, str(tmp / "pairs.jsonl"), a.max_steps, str(tmp / "trl-run"))
        print(f"trl: {peer['tokens_per_second']:.1f} tokens/s over {peer['steps']} steps", flush=True)
    result = {"benchmark": "sft_vs_trl", "conversations": len(records), "max_steps": a.max_steps,
              "batch": BATCH, "max_length": MAX_LENGTH, "precision": "bf16 autocast, fp32 master weights",
              "tunelab": ours, "peer": peer, "speedup": ours["tokens_per_second"] / peer["tokens_per_second"],
              "versions": library_versions() | {"trl": __import__("trl").__version__},
              "machine": {"cpus": os.cpu_count(), "load_average_1min_end": round(os.getloadavg()[0], 2)}}
    write_result(a.out, result)
    print(f"speedup {result['speedup']:.2f}x; wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
