"""report.html's generations section: base vs fine-tuned replies side by side (same prompts, same
seed), the generation measures before and after, the generation health events, and the forgetting
probe's generative view. Reads RUN/generations.json (written by run.save) and summary.json."""

from __future__ import annotations

import html
import json
from pathlib import Path

from tunelab.evaluate.generation_metrics import ROW_KEYS
from tunelab.monitor.health_generation import GEN_KINDS

SAMPLES = 8


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return "" if v is None else html.escape(str(v))


def _cell(text: str | None, limit: int = 400) -> str:
    text = text or ""
    return html.escape(text[:limit] + ("…" if len(text) > limit else ""))


def _pick(evaluations: list[dict]) -> tuple[dict | None, dict | None]:
    before = next((e for e in evaluations if e.get("label") == "before"), None)
    after = next((e for e in reversed(evaluations) if e.get("label") == "final"), None)
    return before, after


def _measures_table(before: dict | None, after: dict | None) -> str:
    head = "<tr><th>measure</th><th>greedy before</th><th>greedy after</th><th>sampled before</th><th>sampled after</th></tr>"
    rows = []
    for key in ROW_KEYS:
        vals = [(e or {}).get(mode, {}).get(key) for mode in ("greedy", "sampled") for e in (before, after)]
        if any(v is not None for v in vals):
            rows.append(f"<tr><th>{key}</th>" + "".join(f"<td>{_fmt(v)}</td>" for v in vals) + "</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _samples_table(record: dict, before: dict | None, after: dict | None, mode: str, n: int) -> str:
    prompts, refs = record["prompts"], record.get("references") or []
    head = ("<tr><th>prompt</th><th>reference</th><th>base</th><th>fine-tuned</th></tr>" if before else
            "<tr><th>prompt</th><th>reference</th><th>fine-tuned</th></tr>")
    rows = []
    for i, p in enumerate(prompts[:n]):
        cells = [_cell(p["prompt"], 200), _cell(refs[i] if i < len(refs) else None, 200)]
        if before:
            cells.append(_cell(before["replies"][mode][i]) + ("" if before["stopped"][mode][i] else " <i>[no stop]</i>"))
        if after:
            cells.append(_cell(after["replies"][mode][i]) + ("" if after["stopped"][mode][i] else " <i>[no stop]</i>"))
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _view(record: dict, title: str, intro: str) -> list[str]:
    before, after = _pick(record.get("evaluations") or [])
    if before is None and after is None:
        return []
    s = record["settings"]
    parts = [f"<h3>{html.escape(title)}</h3><p>{html.escape(intro)} {len(record['prompts'])} prompts, at most "
             f"{s['max_new_tokens']} new tokens; greedy, and sampled at temperature {s['temperature']} with seed "
             f"{s['seed']} (the same prompts and seed before and after). <i>[no stop]</i>: the reply ran out of "
             "tokens without its end-of-turn token.</p>", _measures_table(before, after),
             "<p>greedy replies</p>", _samples_table(record, before, after, "greedy", SAMPLES),
             "<p>sampled replies</p>", _samples_table(record, before, after, "sampled", SAMPLES // 2)]
    return parts


def generations_section(run_dir: str | Path) -> str | None:
    """The section's HTML, or None when the run generated nothing (classification, eval.generate.n: 0)."""
    run_dir = Path(run_dir)
    path = run_dir / "generations.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    parts = ["<h2>generations: base vs fine-tuned</h2>"]
    summary_path = run_dir / "summary.json"
    health = json.loads(summary_path.read_text()).get("health") or {} if summary_path.is_file() else {}
    events = [m for m in health.get("messages", []) if m.get("kind") in GEN_KINDS]
    if events:
        parts.append("<table><tr><th>step</th><th>event</th><th>what to change</th></tr>" + "".join(
            f"<tr><td>{m['step']}</td><th>{html.escape(m['kind'])}</th><td>{html.escape(m['message'])}</td></tr>"
            for m in events) + "</table>")
    else:
        parts.append("<p>no generation health events (never stops, mode collapse, repetition, template leakage)</p>")
    if data.get("eval"):
        parts += _view(data["eval"], "eval prompts", "Prompts of the eval data, reference = its answers:")
    if data.get("probe"):
        parts += _view(data["probe"], "forgetting probe, in words",
                       "General prompts of the probe data, answered before and after fine-tuning:")
    return "\n".join(parts)
