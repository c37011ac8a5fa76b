"""report.html: one self-contained page per run, for a person to read at a glance.

Top to bottom: what ran and how it ended (with notices for what needs attention: a failed
logger, a diverged run, health events), the before/after table, the training curves (loss; lr per
parameter group; grad norm with the clip threshold; throughput; memory) with health events as
markers, one panel per eval metric, the health events, the confusion matrix as a heatmap, weight
drift per layer as a bar chart, generations when the run has them, and the config folded away.
Figures come from analysis/plots.py (matplotlib, PNG data URIs: nothing is fetched at view time).
The layout is a 2-column grid that fits 1280 px.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import yaml

from tunelab.analysis.report_preference import preference_section
from tunelab.durable import write_atomic
from tunelab.errors import InputError
from tunelab.monitor.health import summarize
from tunelab.monitor.metrics_log import read_metrics

CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d1d1f;max-width:1240px;
margin:1.5em auto;padding:0 20px}
h1{font-size:1.6em;margin:.2em 0}h2{font-size:1.2em;margin:1.6em 0 .5em;border-bottom:1px solid #ddd;padding-bottom:.2em}
.sub{color:#555;margin:.2em 0 1em}.status{display:inline-block;padding:1px 9px;border-radius:10px;color:#fff;
font-weight:600;font-size:.85em;vertical-align:middle}.ok{background:#2e7d32}.bad{background:#c62828}.warn{background:#ef6c00}
.notice{border-left:4px solid #ef6c00;background:#fff4e5;padding:.5em .9em;margin:.4em 0}
.notice.bad{border-color:#c62828;background:#fdecea;color:inherit}
.row{display:flex;gap:28px;flex-wrap:wrap;align-items:flex-start}
table{border-collapse:collapse;font-size:.92em}td,th{border:1px solid #ddd;padding:3px 9px;text-align:left}
th{background:#f7f7f7;font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(560px,1fr));gap:14px}
figure{margin:0}figure img{width:100%;height:auto;border:1px solid #eee}figure.wide img{max-width:100%}
details{margin:1em 0}summary{cursor:pointer;font-weight:600}pre{background:#f6f6f6;padding:1em;overflow:auto;font-size:.85em}
"""


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _cos(v) -> str:
    return f"{v:.6f}" if isinstance(v, float) else _fmt(v)  # 0.99999 must not print as 1


def _esc(v) -> str:
    return html.escape(_fmt(v))


def _table(rows: list[tuple[str, object]]) -> str:
    cells = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_esc(v)}</td></tr>" for k, v in rows if v not in (None, ""))
    return f"<table>{cells}</table>"


def _img(png: str, alt: str, name: str, wide: bool = False) -> str:
    return (f"<figure{' class=wide' if wide else ''}><img class='plot' data-plot='{html.escape(name)}' "
            f"alt='{html.escape(alt)}' src='data:image/png;base64,{png}'></figure>")


def _config(run_dir: Path) -> dict:
    try:
        return yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def _groups(run_dir: Path) -> list[dict] | None:
    try:
        return json.loads((run_dir / "param_groups.json").read_text())
    except (OSError, ValueError):
        return None


def notices(summary: dict) -> list[str]:
    """Lines that need a person's attention, as HTML (each already escaped)."""
    out = []
    status = summary.get("status")
    if status == "diverged":
        out.append(("bad", f"training diverged: {summary.get('skipped_steps', 0)} steps had NaN/Inf loss or gradients; "
                           "the last good checkpoint is kept"))
    elif status == "interrupted":
        out.append(("warn", "stopped before the end; resume with --resume auto"))
    for name, state in (summary.get("loggers") or {}).items():
        if state != "ok":
            out.append(("bad", f"logger {name} {state}: its tracking is incomplete (metrics.jsonl has every row)"))
    health = summary.get("health") or {}
    if health.get("events"):
        out.append(("warn", f"{health['events']} training-health event(s): "
                            + ", ".join(f"{k} x{n}" for k, n in health.get("counts", {}).items())))
    if summary.get("worse_than_base"):  # the message names what final/ holds (tunelab.final_weights)
        out.append(("bad", (summary.get("versus_base") or {}).get("message", "this fine-tune is worse than its base")))
    probe = summary.get("probe") or {}
    if probe.get("forgetting_flag"):
        out.append(("warn", f"forgetting probe: {probe.get('message', '')}"))
    trust = summary.get("eval_trust") or {}
    if trust.get("trust") in ("low", "moderate"):  # how far the numbers above generalise (tunelab.defaults)
        out.append(("warn", f"evaluation trust {trust['trust']}: {trust.get('message', '')}"))
    return [f"<div class='notice {kind}'>{html.escape(text)}</div>" for kind, text in out]


def _header(run_dir: Path, summary: dict, model_name: str) -> tuple[str, str]:
    from tunelab.model_card import base_model_name

    status = summary.get("status", "?")
    badge = "ok" if status in ("completed", "early_stopped") else "bad" if status == "diverged" else "warn"
    model = base_model_name(model_name)
    facts = [("model", model), ("task", summary.get("task")), ("method", summary.get("method")),
             ("steps", f"{summary.get('steps')} of {summary.get('total_steps', summary.get('steps'))}"),
             ("trainable params", f"{summary.get('trainable_params', 0):,} of {summary.get('total_params', 0):,} "
                                  f"({summary.get('trainable_percent', 0):.3g}%)" if summary.get("total_params") else None),
             ("precision / device", f"{summary['precision']} / {summary.get('device', '?')}" if summary.get("precision") else None),
             ("tokens/s", summary.get("tokens_per_second")), ("samples/s", summary.get("samples_per_second")),
             ("peak memory MB", summary.get("peak_memory_mb")),
             ("train peak memory MB", summary.get("train_peak_memory_mb")), ("wall seconds", summary.get("wall_seconds"))]
    loggers = summary.get("loggers")
    if loggers:
        facts.append(("loggers", ", ".join(f"{k}: {v}" for k, v in loggers.items())))
    return (f"<h1>{html.escape(run_dir.name)} <span class='status {badge}'>{html.escape(status)}</span></h1>"
            f"<p class='sub'>{html.escape(model)} · {html.escape(str(summary.get('task')))} · "
            f"{html.escape(str(summary.get('method')))} · {html.escape(str(run_dir))}</p>"), _table(facts)


def _before_after(summary: dict) -> str | None:
    final, before = summary.get("final") or {}, summary.get("before") or {}
    from tunelab.model_card import CARD_METRICS

    keys = [k for k in final if isinstance(final[k], (int, float)) and not isinstance(final[k], bool)]
    if not keys:
        return None

    def rows(ks):
        return "".join(f"<tr><th>{html.escape(k)}</th><td class=num>{_esc(before.get('eval_' + k, ''))}</td>"
                       f"<td class=num>{_esc(final[k])}</td></tr>" for k in ks)

    head = "<tr><th>metric</th><th>before</th><th>after</th></tr>"
    main, rest = [k for k in keys if k in CARD_METRICS] or keys, [k for k in keys if k not in CARD_METRICS]
    more = (f"<details><summary>{len(rest)} more measures</summary><table>{head}{rows(rest)}</table></details>"
            if rest and main != keys else "")
    return f"<table>{head}{rows(main)}</table>{more}"


def _curves(rows: list[dict], run_dir: Path, optim: dict, train: dict) -> list[str]:
    """The training curves; `optim`, `train`: the run's config.yaml sections (lr, max_grad_norm drawn in)."""
    from tunelab.analysis import plots

    figs = [("loss", "train and eval loss", plots.loss_figure(rows)),
            ("lr", "learning rate per parameter group", plots.lr_figure(rows, _groups(run_dir), optim.get("lr"))),
            ("grad_norm", "gradient norm and clip threshold", plots.grad_norm_figure(rows, train.get("max_grad_norm"))),
            ("throughput", "tokens per second", plots.throughput_figure(rows)),
            ("memory", "memory over time", plots.memory_figure(rows)),
            ("lr_find", "learning-rate range test (optim.lr: auto)", plots.lr_find_figure(_json_file(run_dir / "lr_find.json")))]
    return [_img(plots.to_png(f), alt, name) for name, alt, f in figs if f is not None]


def _json_file(path: Path) -> dict | None:
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def _eval_panels(rows: list[dict]) -> tuple[list[str], dict]:
    from tunelab.analysis import plots

    keys, constant = plots.eval_metric_keys(rows)
    out = []
    for k in keys:
        f = plots.eval_metric_figure(rows, k)
        if f is not None:
            out.append(_img(plots.to_png(f), f"eval {k}", k))
    return out, constant


def _health_section(health: dict) -> str:
    """One line per health event (monitor/health.py), or a line saying there were none."""
    if not health["events"]:
        return "<h2>training health</h2><p>no health events: no loss spikes, exploding gradients, plateaus, " \
               "overfitting or lr trouble seen</p>"
    counts = ", ".join(f"{k} x{n}" for k, n in health["counts"].items())
    rows = "".join(f"<tr><td class=num>{m['step']}</td><th>{html.escape(m['kind'])}</th><td>{html.escape(m['message'])}</td></tr>"
                   for m in health["messages"])
    more = f"<p>and {health['messages_left_out']} more in metrics.jsonl</p>" if health["messages_left_out"] else ""
    return (f"<h2>training health</h2><p>{health['events']} event(s): {html.escape(counts)} "
            "(marked ▼ on the loss and gradient-norm curves)</p>"
            f"<table><tr><th>step</th><th>kind</th><th>message</th></tr>{rows}</table>{more}")


def _confusion_section(final: dict) -> str | None:
    from tunelab.analysis import plots

    cm, labels = final.get("confusion_matrix"), final.get("labels")
    if not (cm and labels):
        return None
    fig = plots.confusion_figure(cm, [str(x) for x in labels])
    per = final.get("per_class") or {}
    table = ""
    if per:
        table = "<table><tr><th>class</th><th>precision</th><th>recall</th><th>support</th></tr>" + "".join(
            f"<tr><th>{html.escape(str(n))}</th><td class=num>{_esc(m.get('precision'))}</td>"
            f"<td class=num>{_esc(m.get('recall'))}</td><td class=num>{_esc(m.get('support'))}</td></tr>"
            for n, m in per.items()) + "</table>"
    return ("<h2>confusion matrix</h2><div class=row><div style='flex:0 1 560px'>"
            + _img(plots.to_png(fig), "confusion matrix heatmap", "confusion_matrix") + f"</div>{table}</div>")


def _drift_section(run_dir: Path, top: int) -> tuple[str, dict | None, str | None]:
    """The per-layer drift bar chart and the top layers' table when it is cheap to compute, else one line why."""
    from tunelab.analysis import plots
    from tunelab.analysis.drift import drift_for_report

    d, why = drift_for_report(run_dir, top=top)
    if d is None:
        return f"<h2>weight drift</h2><p>not computed: {html.escape(why or 'unknown reason')}</p>", None, why
    o = d["overall"]
    from tunelab.model_card import base_model_name

    parts = [f"<h2>weight drift</h2><p>against base {html.escape(base_model_name(d['base']))} "
             f"({'LoRA adapter' if d['kind'] == 'lora' else 'full fine-tune'}): relative change "
             f"{_esc(o['relative_change'])}, cosine {_cos(o['cosine'])}, over {o['tensors']} tensors</p>"]
    fig = plots.drift_figure(d.get("layers") or [])
    if fig is not None:
        parts.append(_img(plots.to_png(fig), "weight drift per layer", "drift", wide=True))
    parts.append("<details><summary>most-changed layers</summary>"
                 "<table><tr><th>layer</th><th>relative change</th><th>cosine</th><th>|ΔW|</th></tr>")
    parts += [f"<tr><th>{html.escape(r['layer'])}</th><td class=num>{_esc(r['relative_change'])}</td>"
              f"<td class=num>{_cos(r['cosine'])}</td><td class=num>{_esc(r['delta_norm'])}</td></tr>"
              for r in d["top_layers"]]
    parts.append("</table></details>")
    if d["new"]:
        parts.append("<p>new (no base counterpart, not drift): "
                     f"{html.escape(', '.join(t['name'] for t in d['new']))}</p>")
    parts += [f"<p><b>flag</b> {html.escape(f['layer'])}: {html.escape(f['reason'])}</p>" for f in d["flagged"]]
    return "\n".join(parts), d, None


def _generations_section(run_dir: Path) -> str | None:
    """Sample generations, when the run has them (analysis/report_generations.py, the generation-eval work)."""
    try:
        from tunelab.analysis.report_generations import generations_section
    except ImportError:
        return None
    return generations_section(run_dir)


def render_report(run_dir: str | Path, *, drift: bool = True, drift_top: int = 10) -> tuple[str, dict]:
    """The page and what it holds: the sections shown, the plots drawn, and the drift summary or why there is none."""
    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = read_metrics(run_dir / "metrics.jsonl")
    cfg = _config(run_dir)
    final = summary.get("final") or {}
    title, facts = _header(run_dir, summary, str((cfg.get("model") or {}).get("name", "?")))
    sections = ["summary"]
    parts = ["<!doctype html><html lang=en><meta charset='utf-8'>"
             "<meta name=viewport content='width=device-width,initial-scale=1'>"
             f"<title>tunelab · {html.escape(run_dir.name)}</title><style>{CSS}</style><body>", title, *notices(summary)]
    table = _before_after(summary)
    if table:
        sections.append("before_after")
    parts.append(f"<div class=row><div><h2>run</h2>{facts}</div>"
                 + (f"<div><h2>before and after</h2>{table}</div>" if table else "") + "</div>")
    curves = _curves(rows, run_dir, cfg.get("optim") or {}, cfg.get("train") or {})
    if curves:
        sections.append("curves")
        parts.append(f"<h2>training curves</h2><div class=grid>{''.join(curves)}</div>")
    panels, constant = _eval_panels(rows)
    if panels or constant:
        sections.append("eval_metrics")
        parts.append(f"<h2>evaluation metrics</h2><div class=grid>{''.join(panels)}</div>")
        if constant:
            parts.append("<p class=sub>constant over the run: "
                         + html.escape(", ".join(f"{k.removeprefix('eval_')} = {_fmt(v)}" for k, v in constant.items()))
                         + "</p>")
    health = summary.get("health") or summarize(rows)
    sections.append("health")
    parts.append(_health_section(health))
    cm = _confusion_section(final)
    if cm:
        sections.append("confusion_matrix")
        parts.append(cm)
    drift_summary, drift_skipped = None, "not requested"
    if drift:
        section, drift_summary, drift_skipped = _drift_section(run_dir, drift_top)
        sections.append("drift")
        parts.append(section)
    pref = preference_section(rows)  # task: preference (analysis/report_preference.py)
    if pref:
        sections.append("preference")
        parts.append(pref)
    gens = _generations_section(run_dir)
    if gens:
        sections.append("generations")
        parts.append(gens)
    if (run_dir / "config.yaml").is_file():
        sections.append("config")
        parts.append("<h2>config</h2><details><summary>config.yaml (resolved, every default spelled out)</summary>"
                     f"<pre>{html.escape((run_dir / 'config.yaml').read_text())}</pre></details>")
    parts.append("</body></html>")
    if drift_summary is not None:
        drift_summary = {k: drift_summary[k] for k in ("base", "kind", "threshold", "overall", "top_layers", "flagged", "new")}
    page = "\n".join(parts)
    contents = {"run_dir": str(run_dir), "status": summary.get("status"), "task": summary.get("task"),
                "method": summary.get("method"), "sections": sections,
                "plots": [p.split("data-plot='", 1)[1].split("'", 1)[0] for p in page.split("<img class='plot'")[1:]],
                "final": {k: v for k, v in final.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
                "health": health["counts"], "loggers": summary.get("loggers"), "drift": drift_summary,
                "drift_skipped": drift_skipped}
    return page, contents


def write_report(run_dir: str | Path, *, drift: bool = True) -> Path:
    """Write RUN_DIR/report.html (drift section included when it is cheap; see `render_report`)."""
    page, _ = render_report(run_dir, drift=drift)
    out = Path(run_dir) / "report.html"
    write_atomic(out, page)  # never half a page (tunelab.durable)
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
    write_atomic(out, page)  # never half a page (tunelab.durable)
    return {"report": str(out), **contents}
