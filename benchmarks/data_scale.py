"""Data at scale (issue 18): peak memory and tokenization speed of tunelab's first pass (streamed into
the encoded-data cache), of a cached run's data setup, and of `datasets.map` with the same tokenizer.

    flock /work/bench.lock .venv/bin/python benchmarks/data_scale.py --sizes 10000,100000,1000000

Chat files of N rows are built here, in a temporary folder (never in the repo), from the shared
datasets' rows (alpaca_eval GPT-4 and davinci-003 answers, self-instruct seed tasks, ShareGPT
conversations), varied per row (system prompt or not, one or two exchanges drawn at random, answers
cut at a random length), so no two rows need be alike. Each measurement runs in its own spawned
process; its peak RSS is that process's ru_maxrss. The tokenizer and chat template are SmolLM2's
(the embedded chat model). Sides, per size:

- `first_pass`: tunelab's read -> check -> encode -> cache (a fresh cache).
- `cached`: the same call again (a cache hit), plus every row's lengths and one read of every row.
- `whole_file` (sizes up to --whole-max): the path with data.cache: false (everything in memory),
  what every run did before the cache.
- `datasets_map`: Dataset.from_json + a batched map rendering the chat template and tokenizing
  (no loss masks: less work than tunelab does), in a fresh datasets cache.

Results: benchmarks/results/data_scale.json (rows/s and peak MB per side and size, the load
average before and after each measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from benchutil import in_child, write_result  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
OUT = Path(__file__).parent / "results" / "data_scale.json"
MAX_LENGTH = 512


def _exchanges() -> list[tuple[str, str]]:
    """(user, assistant) pairs from the shared datasets."""
    pairs = []
    for name in ("alpaca_eval_gpt4/gpt4.model_outputs.json", "alpaca_eval_davinci003/text_davinci_003.model_outputs.json"):
        pairs += [(r["instruction"], r["output"]) for r in json.loads((SHARED / name).read_text(encoding="utf-8"))]
    for line in (SHARED / "self_instruct_seed/seed_tasks.jsonl").read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        for inst in r["instances"]:
            pairs.append((f"{r['instruction']}\n\n{inst['input']}".strip(), inst["output"] or "(none)"))
    for conv in json.loads((SHARED / "sharegpt_fastchat/dummy_conversation.json").read_text(encoding="utf-8")):
        turns = conv["conversations"]
        pairs += [(a["value"], b["value"]) for a, b in zip(turns[::2], turns[1::2])
                  if a["from"] == "human" and b["from"] == "gpt"]
    return [(u, a) for u, a in pairs if u.strip() and a.strip()]


def build_file(path: Path, n: int, seed: int = 0) -> None:
    pairs, rng = _exchanges(), random.Random(seed)
    systems = ["You are a helpful assistant.", "Answer briefly.", "You are a careful writer."]
    with path.open("w", encoding="utf-8") as f:
        for _ in range(n):
            msgs = [{"role": "system", "content": rng.choice(systems)}] if rng.random() < 0.3 else []
            for _ in range(rng.choice((1, 1, 2))):
                user, answer = rng.choice(pairs)
                cut = max(1, int(len(answer) * rng.uniform(0.3, 1.0)))
                msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": answer[:cut]}]
            f.write(json.dumps({"messages": msgs}) + "\n")


def _peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _config(path: str, cache: bool):
    from tunelab.config import Config

    return Config.model_validate({"task": "chat", "model": {"name": "smollm2-135m-instruct", "max_length": MAX_LENGTH},
                                  "data": {"train": path, "cache": cache, "eval_split": 0},
                                  "early_stopping": {"enabled": False}})


def _tokenizer():
    from tunelab.models.gguf import plain_source
    from tunelab.models.load import load_tokenizer
    from tunelab.models.registry import resolve_model

    return load_tokenizer(plain_source(resolve_model("smollm2-135m-instruct")))


def tunelab_side(path: str, n: int, cache_dir: str, side: str) -> dict:
    """first_pass / cached / whole_file in this (spawned) process."""
    os.environ["TUNELAB_DATA_CACHE"] = cache_dir
    from tunelab.tasks.lm_data import read_and_encode

    tok = _tokenizer()
    base = _peak_mb()
    t0 = time.perf_counter()
    _, table, stats, _ = read_and_encode(path, _config(path, side != "whole_file").data, tok, MAX_LENGTH, "chat")
    lengths = table.lengths
    if side == "cached":
        for i in range(len(table)):  # every row read once, as an epoch does
            table[i]
    secs = time.perf_counter() - t0
    return {"rows": n, "examples": len(table), "tokens": int(lengths.sum()), "seconds": round(secs, 2),
            "rows_per_second": round(n / secs, 1), "peak_rss_mb": round(_peak_mb(), 1),
            "rss_before_mb": round(base, 1), "truncated": stats.get("truncated")}


def datasets_side(path: str, n: int, cache_dir: str) -> dict:
    os.environ["HF_DATASETS_CACHE"] = cache_dir
    import datasets

    tok = _tokenizer()
    base = _peak_mb()
    t0 = time.perf_counter()
    ds = datasets.Dataset.from_json(path, cache_dir=cache_dir)

    def encode(batch):
        texts = [tok.apply_chat_template(m, tokenize=False) for m in batch["messages"]]
        return tok(texts, add_special_tokens=False, truncation=True, max_length=MAX_LENGTH)

    out = ds.map(encode, batched=True, batch_size=256, remove_columns=ds.column_names)
    tokens = sum(len(x) for x in out["input_ids"])
    secs = time.perf_counter() - t0
    return {"rows": n, "tokens": tokens, "seconds": round(secs, 2), "rows_per_second": round(n / secs, 1),
            "peak_rss_mb": round(_peak_mb(), 1), "rss_before_mb": round(base, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--whole-max", type=int, default=100_000, help="largest size the in-memory path is run at")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    if not SHARED.is_dir():
        print(f"skipped: {SHARED} is missing")
        return
    result = {"script": "benchmarks/data_scale.py", "max_length": MAX_LENGTH, "tokenizer": "SmolLM2-135M-Instruct",
              "cpus": os.cpu_count(), "complete": False, "sizes": {}}
    with tempfile.TemporaryDirectory(prefix="data_scale_") as tmp:
        for n in (int(s) for s in args.sizes.split(",")):
            path = Path(tmp) / f"chat_{n}.jsonl"
            build_file(path, n)
            sides = {"file_mb": round(path.stat().st_size / 2**20, 1)}
            cache = tempfile.mkdtemp(dir=tmp)
            plan = [("first_pass", tunelab_side, (str(path), n, cache, "first_pass")),
                    ("cached", tunelab_side, (str(path), n, cache, "cached"))]
            if n <= args.whole_max:
                plan.append(("whole_file", tunelab_side, (str(path), n, cache, "whole_file")))
            plan.append(("datasets_map", datasets_side, (str(path), n, tempfile.mkdtemp(dir=tmp))))
            for name, fn, fargs in plan:
                load = os.getloadavg()
                sides[name] = in_child(fn, *fargs) | {"loadavg_before": [round(x, 2) for x in load],
                                                      "loadavg_after": [round(x, 2) for x in os.getloadavg()]}
                print(n, name, sides[name], flush=True)
                result["sizes"][str(n)] = sides
                write_result(args.out, result)
            path.unlink()
    result["complete"] = True
    write_result(args.out, result)


if __name__ == "__main__":
    main()
