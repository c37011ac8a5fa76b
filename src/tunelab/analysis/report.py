"""report.html: one self-contained page per run (summary, curves, confusion matrix, config)."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

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


def write_report(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = read_metrics(run_dir / "metrics.jsonl")
    png = _curves_png(rows)
    final = summary.get("final") or {}
    before = summary.get("before") or {}
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
        parts.append("<h2>before and after</h2><table><tr><th>metric</th><th>before</th><th>after</th></tr>")
        for k in metric_keys:
            parts.append(f"<tr><th>{k}</th><td>{_fmt(before.get('eval_' + k, ''))}</td><td>{_fmt(final[k])}</td></tr>")
        parts.append("</table>")
    if png:
        parts.append(f"<h2>curves</h2><img alt='training curves' src='data:image/png;base64,{png}'>")
    cm, labels = final.get("confusion_matrix"), final.get("labels")
    if cm and labels:
        head = "".join(f"<th>pred {html.escape(n)}</th>" for n in labels)
        body = "".join(f"<tr><th>true {html.escape(n)}</th>" + "".join(f"<td>{v}</td>" for v in row) + "</tr>"
                       for n, row in zip(labels, cm))
        parts.append(f"<h2>confusion matrix</h2><table><tr><th></th>{head}</tr>{body}</table>")
    cfg = run_dir / "config.yaml"
    if cfg.is_file():
        parts.append(f"<h2>config</h2><pre>{html.escape(cfg.read_text())}</pre>")
    out = run_dir / "report.html"
    out.write_text("\n".join(parts), encoding="utf-8")
    return out
