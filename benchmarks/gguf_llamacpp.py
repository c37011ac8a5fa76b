"""SmolLM2-135M-Instruct exported to GGUF (f16, q8_0, q4_k_m) and run in real llama.cpp.

For each type: the file's size and tensor-type mix; the transformers read-back check (relative max
logit difference, greedy agreement: export/check.compare); and llama.cpp (node-llama-cpp's CPU
build, `make llamacpp`) loading the file, tokenizing the prompts and continuing them greedily,
against the fp32 source (export/check.compare_llamacpp). The files are written with
write_gguf directly, so a type the export check would refuse is still measured here.

    .venv/bin/python benchmarks/gguf_llamacpp.py [--quants f16 q8_0 q4_k_m] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

PROMPTS = ["<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
           "<|im_start|>user\nWrite one sentence about the sea.<|im_end|>\n<|im_start|>assistant\n",
           "<|im_start|>user\nList three colours and 2 numbers: 17 and 2026.<|im_end|>\n<|im_start|>assistant\n",
           "The year 1984 was"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quants", nargs="+", default=["f16", "q8_0", "q4_k_m"])
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "gguf_llamacpp.json"))
    args = ap.parse_args()

    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.export import llamacpp
    from tunelab.export.check import compare, compare_llamacpp
    from tunelab.export.gguf_writer import write_gguf
    from tunelab.models.gguf import ensure_converted, read_gguf
    from tunelab.models.registry import resolve_model

    if llamacpp.available():
        raise SystemExit(f"llama.cpp: {llamacpp.available()}")
    src = resolve_model("smollm2-135m-instruct")
    folder = ensure_converted(Path(src.path) / src.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for quant in args.quants:
            path = Path(tmp) / f"smollm2-{quant}.gguf"
            t0 = time.perf_counter()
            written = write_gguf(model, tok, path, quant, name="smollm2")
            write_s = time.perf_counter() - t0
            back, back_tok = read_gguf(path)
            report = compare(model, back, tok, PROMPTS, quant, output_tokenizer=back_tok, new_tokens=args.new_tokens)
            del back
            t0 = time.perf_counter()
            lc = compare_llamacpp(model, tok, PROMPTS, report, path)
            lc_s = time.perf_counter() - t0
            pre = gguf.GGUFReader(path).fields["tokenizer.ggml.pre"].contents()
            rows.append({"quant": quant, "mib": round(written["bytes"] / 2**20, 1), "tensor_types": written["tensor_types"],
                         "tokenizer_pre": pre, "write_seconds": round(write_s, 1),
                         "transformers": {k: report[k] for k in ("relative_logit_diff", "max_logit_diff", "greedy_equal",
                                                                 "greedy_near_ties", "tokenizer_equal", "passed")},
                         "llama_cpp": {k: lc[k] for k in ("tokenizer_equal", "greedy_equal", "greedy_near_ties", "passed")},
                         "llama_cpp_seconds": round(lc_s, 1),
                         "continuations": [{"source": r["source_continuation"], "llama_cpp": l["llamacpp_continuation"]}
                                           for r, l in zip(report["per_prompt"], lc["per_prompt"])]})
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "continuations"}), flush=True)
    import importlib.metadata as md

    out = {"model": "smollm2-135m-instruct (embedded, converted from its Q4_1 GGUF)", "prompts": len(PROMPTS),
           "new_tokens": args.new_tokens, "node_llama_cpp": llamacpp.NODE_LLAMA_CPP,
           "versions": {p: md.version(p) for p in ("gguf", "transformers", "torch")},
           "load_average": os.getloadavg(), "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=1), encoding="utf-8")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
