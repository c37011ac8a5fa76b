"""How a training run uses the generation evaluation (evaluate/generation.py): which prompts, when
it runs, and where its results go.

- prompts: `eval.generate.prompts` (a file), else the eval data's prompts (the eval file, or the
  conversations held out by `data.eval_split`);
- when: the untouched model first (the `before_training` row), then at every evaluation
  (`every: eval`) or only at the end (`every: end`, the default: generation costs more than a
  loss), and once more on the weights `final/` ships;
- where: `eval_gen_*` measures in metrics.jsonl rows (where the health monitor judges them: never
  stops, mode collapse, repetition, template leakage), `final` / `before` and `generation` in
  summary.json, every reply in RUN/generations.json (the report's side-by-side samples).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from tunelab.evaluate.generation import (GenerationEval, compare_generations, prompts_from_chat_data, read_prompts,
                                         settings_dict)

log = logging.getLogger("tunelab")


def held_out_at(data, n_examples: int, keep: list[int]):
    """The ChatData of the records at indices `keep`, when the `n_examples` encoded examples map one
    to one onto records (None when records were dropped or chunked)."""
    from tunelab.data.chat import ChatData

    items = data.conversations if data.kind == "conversations" else data.texts
    if len(items) != n_examples:  # dropped or chunked records: no one-to-one map
        return None
    picked = [items[i] for i in keep]
    sources = [data.sources[i] for i in keep]
    if data.kind == "conversations":
        return ChatData("conversations", conversations=picked, sources=sources)
    return ChatData("text", texts=picked, sources=sources)


def generation_for(section, tokenizer, eval_data) -> GenerationEval | None:
    """The run's GenerationEval, or None when generation is off or there are no prompts.

    `section`: the config's eval.generate section; `eval_data`: the ChatData the eval prompts come
    from (the eval file, or the held-out part of the training file), or None.
    """
    if not section.n:
        return None
    if section.prompts:
        prompts = read_prompts(section.prompts, section.n)
    elif eval_data is not None:
        prompts = prompts_from_chat_data(eval_data, section.n)
    else:
        prompts = []
    if not prompts:
        log.warning("eval.generate: no prompts (no eval data, and eval.generate.prompts unset): nothing generated")
        return None
    return GenerationEval(tokenizer, prompts, section)


def with_generation(evaluate, gen: GenerationEval | None):
    """The task's evaluate, plus the generation measures at each evaluation when `every: eval`."""
    if gen is None or gen.settings.every != "eval":
        return evaluate

    def evaluate_and_generate(model) -> dict:
        return {**evaluate(model), **gen.flat(gen(model, "eval"))}

    return evaluate_and_generate


def add_before(gen: GenerationEval | None, model, before: dict | None) -> None:
    """Put the untouched model's generation measures into the before-training row (in place)."""
    if gen is None or before is None:
        return
    if "eval_gen_stop_rate" in before and gen.history:  # every: eval generated inside the evaluation
        gen.history[-1]["label"] = "before"
        return
    before.update({f"eval_{k}": v for k, v in gen.flat(gen(model, "before")).items()})


def finish(gen: GenerationEval | None, probe_gen: GenerationEval | None, model, io, step: int, summary: dict) -> None:
    """After final/ is written: generate with the shipped weights, add the measures to the summary,
    log a `final_generation` row (health events judged on it too) and write RUN/generations.json."""
    if gen is None and probe_gen is None:
        return
    record = {}
    if gen is not None:
        result = gen(model, "final", step)
        flat = gen.flat(result)
        if summary.get("final") is not None:
            summary["final"].update(flat)
        before = next((e for e in gen.history if e["label"] == "before"), None)
        summary["generation"] = {"settings": settings_dict(gen.settings), "prompts": len(gen.prompts),
                                 "before": {m: before[m] for m in ("greedy", "sampled")} if before else None,
                                 "after": {m: result[m] for m in ("greedy", "sampled")},
                                 "compare": compare_generations(before, result) if before else None}
        _log_final_row(io, {"step": step, "final_generation": True, **{f"eval_{k}": v for k, v in flat.items()}})
        record["eval"] = gen.record()
    if probe_gen is not None and probe_gen.history:
        record["probe"] = probe_gen.record()
    tmp = Path(io.root) / "generations.json.tmp"
    tmp.write_text(json.dumps(record, indent=1), encoding="utf-8")
    os.replace(tmp, Path(io.root) / "generations.json")


def _log_final_row(io, row: dict) -> None:
    """Append the row and the health events it raises to metrics.jsonl (the loop's log is closed by now)."""
    from tunelab.monitor.metrics_log import MetricsLog

    events = io.health.observe(row) if io.health is not None else []
    metrics = MetricsLog(Path(io.root) / "metrics.jsonl")
    try:
        for r in (row, *(e.row() for e in events)):
            metrics.write(r)
    finally:
        metrics.close()
    for e in events:
        log.warning("health at step %d: %s", e.step, e.message)
