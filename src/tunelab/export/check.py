"""Every merge and export ends here: the output against the source, on a few real prompts.

"Garbage after merge" is a common report with every fine-tuning tool: a wrong rotary permutation,
a dropped tied head, a tokenizer that splits text differently, an adapter folded in with the
wrong scale. Each shows in the logits at once, so after writing, the output is read back the way
a user would read it and compared with the model it came from:

- max |logit difference| over every position of every prompt, also relative to the source
  logits' standard deviation (scale-free: a tiny random model and a 135M one are judged alike);
- greedy continuations of `new_tokens` tokens from each prompt, compared token by token;
- for a GGUF, the tokenizer read back from the file must split the prompts into the same ids.

Tolerances are per output type (`TOLERANCES`, relative logit difference; measured on the tiny
test Llama and SmolLM2-135M, see the README). Greedy continuations must be equal, with one
exception: where they part, the source's margin between its own choice and the output's choice
is below twice the type's tolerance (a near-tie that rounding alone may flip; the report marks
it `near_tie`). Beyond tolerance is an error (exit 1), not a warning; the JSON report is written
beside the output either way.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tunelab.errors import RunFailure

# max |logit diff| / std(source logits): what each output type may cost
TOLERANCES = {"fp32": 1e-4, "f32": 1e-4, "fp16": 2e-2, "f16": 2e-2, "bf16": 8e-2, "q8_0": 0.3, "q4_0": 1.0,
              "q4_k_m": 1.0}
REPORT = "export_check.json"


class ExportMismatch(RunFailure):
    """The written model does not behave like its source (beyond the tolerance of its type)."""


@torch.no_grad()
def _logits(model, ids: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([ids], device=model.device)).logits[0].float().cpu()


@torch.no_grad()
def greedy(model, ids: list[int], new_tokens: int) -> list[int]:
    """`new_tokens` greedy tokens after `ids` (no stop token: both sides produce the same length)."""
    out = list(ids)
    for _ in range(new_tokens):
        out.append(int(_logits(model, out)[-1].argmax()))
    return out[len(ids):]


def parting(source, ids: list[int], ga: list[int], gb: list[int]) -> tuple[int, float | None]:
    """Where the source's greedy continuation `ga` and another's `gb` of `ids` part (the number of equal
    leading tokens), and the source's preference for its token over the other's there (None when they
    do not part within the shorter one)."""
    same = next((i for i, (x, y) in enumerate(zip(ga, gb)) if x != y), min(len(ga), len(gb)))
    if same >= min(len(ga), len(gb)):
        return same, None
    at = _logits(source, ids + ga[:same])[-1]
    return same, float(at[ga[same]] - at[gb[same]])


def compare(source, output, tokenizer, prompts: list[str], kind: str, *, output_tokenizer=None,
            new_tokens: int = 8) -> dict:
    """The check as a JSON-ready dict; `passed` says whether it is within `TOLERANCES[kind]`."""
    rel_tol = TOLERANCES[kind]
    rows, scale_parts, max_diff = [], [], 0.0
    tokens_equal = True
    for text in prompts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if output_tokenizer is not None:
            tokens_equal &= output_tokenizer(text, add_special_tokens=False)["input_ids"] == ids
        a, b = _logits(source, ids), _logits(output, ids)
        diff = float((a - b).abs().max())
        max_diff = max(max_diff, diff)
        scale_parts.append(a.flatten())
        ga, gb = greedy(source, ids, new_tokens), greedy(output, ids, new_tokens)
        same, margin = parting(source, ids, ga, gb)
        rows.append({"prompt_tokens": len(ids), "max_logit_diff": diff, "greedy_equal": ga == gb,
                     "source_greedy_ids": ga,
                     "greedy_agree_tokens": same, "margin_where_they_part": margin,
                     "source_continuation": tokenizer.decode(ga), "output_continuation": tokenizer.decode(gb)})
    scale = float(torch.cat(scale_parts).std()) if scale_parts else 1.0
    rel = max_diff / scale if scale > 0 else float("inf")
    for r in rows:
        r["near_tie"] = r["margin_where_they_part"] is not None and r["margin_where_they_part"] < 2 * rel_tol * scale
    greedy_bad = [r for r in rows if not r["greedy_equal"] and not r["near_tie"]]
    problems = []
    if rel > rel_tol:
        problems.append(f"max logit difference {max_diff:.4g} is {rel:.3g} x the logits' std (tolerance {rel_tol:g} "
                        f"for {kind})")
    if greedy_bad:
        problems.append(f"greedy continuations part on {len(greedy_bad)} of {len(rows)} prompts where the source "
                        f"prefers its token by more than the {kind} tolerance allows (not a near-tie)")
    if not tokens_equal:
        problems.append("the written tokenizer splits the prompts into other token ids")
    return {"kind": kind, "prompts": len(prompts), "new_tokens": new_tokens, "max_logit_diff": max_diff,
            "logit_std": scale, "relative_logit_diff": rel, "tolerance_relative": rel_tol,
            "greedy_equal": sum(r["greedy_equal"] for r in rows), "greedy_near_ties": sum(r["near_tie"] for r in rows),
            "tokenizer_equal": tokens_equal, "passed": not problems, "problems": problems, "per_prompt": rows}


def compare_llamacpp(source, tokenizer, prompts: list[str], report: dict, gguf_file) -> dict:
    """The written GGUF run by real llama.cpp (export.llamacpp) against the source: llama.cpp's tokenization
    of each prompt must equal the tokenizer's, and its greedy continuation the source's, with the same
    near-tie exception and tolerance as `compare` (llama.cpp also rounds activations to 8 bits in its
    quantised matmuls, so a near-tie may flip there too). `report` is `compare`'s result for this file."""
    from tunelab.export import llamacpp

    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in prompts]
    got = llamacpp.run(gguf_file, ids, prompts, new_tokens=report["new_tokens"])
    tol = report["tolerance_relative"] * report["logit_std"]
    rows, parted = [], 0
    for want_ids, row, cont, toks in zip(ids, report["per_prompt"], got["greedy"], got["tokenized"]):
        ga = row["source_greedy_ids"]
        same, margin = parting(source, want_ids, ga, cont)
        near_tie = margin is not None and margin < 2 * tol
        parted += cont != ga and not near_tie
        rows.append({"tokens_equal": toks == want_ids, "greedy_equal": cont == ga, "greedy_agree_tokens": same,
                     "near_tie": near_tie, "llamacpp_continuation": tokenizer.decode(cont)})
    problems = []
    if not all(r["tokens_equal"] for r in rows):
        problems.append("llama.cpp splits the prompts into other token ids than the tokenizer")
    if parted:
        problems.append(f"llama.cpp's greedy continuations part from the source's on {parted} of {len(rows)} "
                        "prompts (not near-ties)")
    return {"ran": True, "tokenizer_equal": all(r["tokens_equal"] for r in rows),
            "greedy_equal": sum(r["greedy_equal"] for r in rows),
            "greedy_near_ties": sum(r["near_tie"] for r in rows), "passed": not problems, "problems": problems,
            "per_prompt": rows}


def check_and_save(source, output, tokenizer, prompts: list[str], kind: str, report_path: str | Path,
                   **kwargs) -> dict:
    """`compare`, saved as JSON at `report_path`; ExportMismatch when it did not pass."""
    report = compare(source, output, tokenizer, prompts, kind, **kwargs)
    Path(report_path).write_text(json.dumps(report, indent=1), encoding="utf-8")
    if not report["passed"]:
        raise ExportMismatch(f"the written model does not match its source: {'; '.join(report['problems'])} "
                             f"(details in {report_path})")
    return report


def summary_line(report: dict) -> str:
    """One line for the terminal."""
    ties = f" ({report['greedy_near_ties']} near-ties)" if report["greedy_near_ties"] else ""
    return (f"check ({report['kind']}, {report['prompts']} prompts): max logit diff {report['max_logit_diff']:.3g} "
            f"({report['relative_logit_diff']:.3g} x std, tolerance {report['tolerance_relative']:g}), "
            f"greedy equal {report['greedy_equal']}/{report['prompts']}{ties}"
            f"{'' if report['tokenizer_equal'] else ', TOKENIZER DIFFERS'}: {'ok' if report['passed'] else 'FAILED'}"
            + _llamacpp_line(report.get("llama_cpp")))


def _llamacpp_line(lc: dict | None) -> str:
    if not lc:
        return ""
    if not lc.get("ran"):
        return f"; llama.cpp not run ({lc.get('why')})"
    return (f"; llama.cpp: tokens {'equal' if lc['tokenizer_equal'] else 'DIFFER'}, greedy equal "
            f"{lc['greedy_equal']}/{len(lc['per_prompt'])}: {'ok' if lc['passed'] else 'FAILED'}")
