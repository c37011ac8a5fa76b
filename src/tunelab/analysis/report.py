"""report.html: one self-contained page per run (summary, curves, confusion matrix, weight drift, config)."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from tunelab.errors import InputError
from tunelab.monitor.health import summarize
from tunelab.monitor.metrics_log import read_metrics


def _curves_png(rows: list[dict]) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    if not train and not evals:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    ax = axes[0]
    if train:
        ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    for i, step in enumerate(sorted({r["step"] for r in rows if r.get("event") == "health"})):
        ax.axvline(step, color="red", linestyle=":", alpha=0.6, label="health event" if i == 0 else None)
    ax.set_xlabel("step"), ax.set_title("loss"), ax.legend()
    ax = axes[1]
    for key in sorted({k for r in evals for k in r if k.startswith("eval_") and k != "eval_loss"}):
        pts = [(r["step"], r[key]) for r in evals if isinstance(r.get(key), (int, float))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=key)
    if train:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in train], [r["lr"] for r in train], color="gray", alpha=0.4, label="lr")
        ax2.set_ylabel("lr")
    ax.set_xlabel("step"), ax.set_title("eval metrics"), ax.legend(loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _table(rows: list[tuple[str, object]]) -> str:
    cells = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _cos(v) -> str:
    return f"{v:.6f}" if isinstance(v, float) else _fmt(v)  # 0.99999 must not print as 1


def _drift_section(run_dir: Path, top: int) -> tuple[str, dict | None, str | None]:
    """The weight-drift table (top layers by relative change) when it is cheap to compute, else one line why."""
    from tunelab.analysis.drift import drift_for_report

    d, why = drift_for_report(run_dir, top=top)
    if d is None:
        return f"<h2>weight drift</h2><p>not computed: {html.escape(why or 'unknown reason')}</p>", None, why
    o = d["overall"]
    parts = [f"<h2>weight drift</h2><p>against base {html.escape(d['base'])} "
             f"({'LoRA adapter' if d['kind'] == 'lora' else 'full fine-tune'}): relative change "
             f"{_fmt(o['relative_change'])}, cosine {_cos(o['cosine'])}, over {o['tensors']} tensors</p>",
             "<table><tr><th>layer</th><th>relative change</th><th>cosine</th><th>|ΔW|</th></tr>"]
    parts += [f"<tr><th>{html.escape(r['layer'])}</th><td>{_fmt(r['relative_change'])}</td><td>{_cos(r['cosine'])}</td>"
              f"<td>{_fmt(r['delta_norm'])}</td></tr>" for r in d["top_layers"]]
    parts.append("</table>")
    if d["new"]:
        parts.append("<p>new (no base counterpart, not drift): "
                     f"{html.escape(', '.join(t['name'] for t in d['new']))}</p>")
    parts += [f"<p><b>flag</b> {html.escape(f['layer'])}: {html.escape(f['reason'])}</p>" for f in d["flagged"]]
    return "\n".join(parts), d, None


def _health_section(health: dict) -> str:
    """One line per health event (monitor/health.py), or a line saying there were none."""
    if not health["events"]:
        return "<h2>training health</h2><p>no health events: no loss spikes, exploding gradients, plateaus, " \
               "overfitting or lr trouble seen</p>"
    counts = ", ".join(f"{k} x{n}" for k, n in health["counts"].items())
    rows = "".join(f"<tr><td>{m['step']}</td><th>{html.escape(m['kind'])}</th><td>{html.escape(m['message'])}</td></tr>"
                   for m in health["messages"])
    more = f"<p>and {health['messages_left_out']} more in metrics.jsonl</p>" if health["messages_left_out"] else ""
    return (f"<h2>training health</h2><p>{health['events']} event(s): {html.escape(counts)}</p>"
            f"<table><tr><th>step</th><th>kind</th><th>message</th></tr>{rows}</table>{more}")


def render_report(run_dir: str | Path, *, drift: bool = True, drift_top: int = 10) -> tuple[str, dict]:
    """The page and what it holds: the sections shown, and the drift summary or why there is none."""
    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = read_metrics(run_dir / "metrics.jsonl")
    png = _curves_png(rows)
    final = summary.get("final") or {}
    before = summary.get("before") or {}
    sections = ["summary"]
    parts = [
        "<!doctype html><meta charset='utf-8'><title>tunelab run</title>",
        "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}pre{background:#f6f6f6;padding:1em}</style>",
        f"<h1>tunelab run: {html.escape(run_dir.name)}</h1>",
        _table([(k, summary.get(k)) for k in ("status", "task", "steps", "precision", "trainable_params", "total_params",
                                             "samples_per_second", "tokens_per_second", "peak_memory_mb", "wall_seconds")]),
    ]
    metric_keys = [k for k in final if isinstance(final[k], (int, float))]
    if metric_keys:
        sections.append("before_after")
        parts.append("<h2>before and after</h2><table><tr><th>metric</th><th>before</th><th>after</th></tr>")
        for k in metric_keys:
            parts.append(f"<tr><th>{k}</th><td>{_fmt(before.get('eval_' + k, ''))}</td><td>{_fmt(final[k])}</td></tr>")
        parts.append("</table>")
    if png:
        sections.append("curves")
        parts.append(f"<h2>curves</h2><img alt='training curves' src='data:image/png;base64,{png}'>")
    health = summary.get("health") or summarize(rows)
    sections.append("health")
    parts.append(_health_section(health))
    cm, labels = final.get("confusion_matrix"), final.get("labels")
    if cm and labels:
        sections.append("confusion_matrix")
        head = "".join(f"<th>pred {html.escape(n)}</th>" for n in labels)
        body = "".join(f"<tr><th>true {html.escape(n)}</th>" + "".join(f"<td>{v}</td>" for v in row) + "</tr>"
                       for n, row in zip(labels, cm))
        parts.append(f"<h2>confusion matrix</h2><table><tr><th></th>{head}</tr>{body}</table>")
    drift_summary, drift_skipped = None, "not requested"
    if drift:
        section, drift_summary, drift_skipped = _drift_section(run_dir, drift_top)
        sections.append("drift")
        parts.append(section)
    cfg = run_dir / "config.yaml"
    if cfg.is_file():
        sections.append("config")
        parts.append(f"<h2>config</h2><pre>{html.escape(cfg.read_text())}</pre>")
    if drift_summary is not None:
        drift_summary = {k: drift_summary[k] for k in ("base", "kind", "threshold", "overall", "top_layers", "flagged", "new")}
    contents = {"run_dir": str(run_dir), "status": summary.get("status"), "task": summary.get("task"),
                "method": summary.get("method"), "sections": sections,
                "final": {k: final[k] for k in metric_keys}, "health": health["counts"], "drift": drift_summary,
                "drift_skipped": drift_skipped}
    return "\n".join(parts), contents


def write_report(run_dir: str | Path, *, drift: bool = True) -> Path:
    """Write RUN_DIR/report.html (drift section included when it is cheap; see `render_report`)."""
    page, _ = render_report(run_dir, drift=drift)
    out = Path(run_dir) / "report.html"
    out.write_text(page, encoding="utf-8")
    return out


def rewrite_report(run_dir: str | Path, *, drift: bool = True, drift_top: int = 10) -> dict:
    """`tunelab report`: (re)write report.html of a finished run dir; returns {"report": path, ...contents}."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError("not found" if not run_dir.exists() else "expected a run dir, found a file", file=run_dir)
    if not (run_dir / "summary.json").is_file():
        raise InputError("not a finished run dir (no summary.json)", file=run_dir)
    try:
        json.loads((run_dir / "summary.json").read_text())
    except ValueError as e:
        raise InputError(f"summary.json is not valid JSON ({e})", file=run_dir / "summary.json") from None
    page, contents = render_report(run_dir, drift=drift, drift_top=drift_top)
    out = run_dir / "report.html"
    out.write_text(page, encoding="utf-8")
    return {"report": str(out), **contents}
