"""`tunelab compare RUN [RUN ...]`: several runs side by side.

A RUN is a run dir (it holds summary.json or metrics.jsonl) or a folder of run dirs (a sweep: its
children, two levels deep at most, are taken in name order). The comparison holds: final and best
metrics in one table, speed and memory, the config keys whose values differ between the runs (the
rest is folded away), and the curves of every run overlaid, one quantity per axis. As a page
(`-o page.html`, self-contained like report.html), as lines for the terminal, or as JSON.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import yaml

from tunelab.errors import InputError
from tunelab.monitor.metrics_log import read_metrics

SPEED_KEYS = ("tokens_per_second", "samples_per_second", "peak_memory_mb", "wall_seconds")


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "summary.json").is_file() or (path / "metrics.jsonl").is_file())


def find_runs(paths: list[Path]) -> list[Path]:
    """The run dirs the arguments name: each a run dir, or a sweep folder holding run dirs."""
    runs: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise InputError("not found", file=p)
        if is_run_dir(p):
            runs.append(p)
            continue
        if not p.is_dir():
            raise InputError("expected a run dir or a folder of run dirs, found a file", file=p)
        found = sorted(c for c in p.iterdir() if is_run_dir(c))
        found += sorted(g for c in sorted(p.iterdir()) if c.is_dir() and not is_run_dir(c) for g in c.iterdir()
                        if is_run_dir(g))
        if not found:
            raise InputError("not a run dir (no summary.json or metrics.jsonl) and holds no run dirs", file=p)
        runs += found
    unique = list(dict.fromkeys(r.resolve() for r in runs))
    if len(unique) < len(runs):
        runs = [Path(r) for r in unique]
    return runs


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _names(runs: list[Path]) -> list[str]:
    """Short unique names: the folder names, or the paths below the common parent where those repeat."""
    names = [r.name for r in runs]
    if len(set(names)) == len(names):
        return names
    import os

    common = Path(os.path.commonpath([str(r.resolve()) for r in runs]))
    return [str(r.resolve().relative_to(common)) or r.name for r in runs]


def _load(run: Path, name: str) -> dict:
    try:
        summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    except ValueError as e:
        raise InputError(f"summary.json is not valid JSON ({e})", file=run / "summary.json") from None
    try:
        config = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else {}
    except yaml.YAMLError as e:
        raise InputError(f"config.yaml is not valid YAML ({e})", file=run / "config.yaml") from None
    rows = read_metrics(run / "metrics.jsonl")
    final = {k: v for k, v in (summary.get("final") or {}).items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)}
    best = summary.get("best") or {}
    return {"name": name, "run_dir": str(run), "status": summary.get("status", "unfinished"),
            "task": summary.get("task", (config or {}).get("task")), "method": summary.get("method", (config or {}).get("method")),
            "steps": summary.get("steps", max((r.get("step", 0) for r in rows), default=0)),
            "final": final, "before": {k.removeprefix("eval_"): v for k, v in (summary.get("before") or {}).items()
                                       if k.startswith("eval_") and isinstance(v, (int, float))},
            "best": {k: best.get(k) for k in ("metric", "value", "step")},
            **{k: summary.get(k) for k in SPEED_KEYS}, "loggers": summary.get("loggers"),
            "_config": flatten(config or {}), "_rows": rows}


def _defaults() -> dict:
    from tunelab.config import Config
    from tunelab.suggest import schema_keys

    return {k["key"]: k["default"] for k in schema_keys(Config) if k["default"] != "(required)"}


def compare_runs(paths: list[Path]) -> dict:
    """The comparison as plain data (see the module docstring); curves stay in `_rows` for the page."""
    runs = find_runs(paths)
    loaded = [_load(r, n) for r, n in zip(runs, _names(runs))]
    keys = list(dict.fromkeys(k for r in loaded for k in r["_config"]))
    defaults = _defaults()  # a key an older run's config.yaml lacks had today's default
    differ = {}
    for k in keys:
        values = [r["_config"].get(k, defaults.get(k, "(absent)")) for r in loaded]
        if len({json.dumps(v, sort_keys=True, default=str) for v in values}) > 1:
            differ[k] = {r["name"]: v for r, v in zip(loaded, values)}
    metrics = list(dict.fromkeys(k for r in loaded for k in r["final"]))
    return {"runs": loaded, "config_differences": differ, "metrics": metrics}


def public(result: dict) -> dict:
    """The comparison without the raw rows and configs (what --json prints)."""
    return {**result, "runs": [{k: v for k, v in r.items() if not k.startswith("_")} for r in result["runs"]]}


def _num(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "–" if v is None else str(v)


def compare_lines(result: dict) -> list[str]:
    """The comparison for a terminal: a table of runs, then the config keys that differ."""
    runs, metrics = result["runs"], result["metrics"][:5]
    name_w = max(4, *(len(r["name"]) for r in runs))
    cols = ["status", "steps", *metrics, "tokens/s", "peak MB"]
    lines = [f"{'run':<{name_w}}  " + "  ".join(f"{c:>12}" for c in cols)]
    for r in runs:
        cells = [r["status"], r["steps"], *(r["final"].get(m) for m in metrics), r["tokens_per_second"], r["peak_memory_mb"]]
        lines.append(f"{r['name']:<{name_w}}  " + "  ".join(f"{_num(c):>12}" for c in cells))
    diffs = result["config_differences"]
    shown = {k: v for k, v in diffs.items() if not k.startswith("versions.")}
    lines.append("config differences:" if shown else "config: the same in every run")
    for k, by_run in shown.items():
        lines.append(f"  {k}: " + ", ".join(f"{n}={_num(v)}" for n, v in by_run.items()))
    return lines


# ---------------------------------------------------------------- the page


def _figures(result: dict) -> list[str]:
    from tunelab.analysis import plots
    from tunelab.analysis.report import _img

    runs = result["runs"]
    figs = [("loss", plots.overlay_figure("train loss", "loss", [(r["name"], plots.series(r["_rows"], "loss")) for r in runs])),
            ("eval_loss", plots.overlay_figure("eval loss", "loss", [(r["name"], plots.series(r["_rows"], "eval_loss"))
                                                                     for r in runs], "o-"))]
    keys = list(dict.fromkeys(k for r in runs for k in plots.eval_metric_keys(r["_rows"])[0]))
    figs += [(k, plots.overlay_figure(f"eval {k.removeprefix('eval_')}", k.removeprefix("eval_"),
                                      [(r["name"], plots.series(r["_rows"], k, skip_before=True)) for r in runs], "o-"))
             for k in keys]
    figs.append(("lr", plots.overlay_figure("learning rate", "lr", [(r["name"], plots.series(r["_rows"], "lr")) for r in runs])))
    figs.append(("tokens_per_second", plots.bar_figure("speed", "tokens / s", [(r["name"], r["tokens_per_second"]) for r in runs])))
    figs.append(("peak_memory_mb", plots.bar_figure("peak memory", "MB", [(r["name"], r["peak_memory_mb"]) for r in runs])))
    return [_img(plots.to_png(f), name, name) for name, f in figs if f is not None]


def _table(result: dict) -> str:
    runs, metrics = result["runs"], result["metrics"]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["run", "status", "steps", *metrics, "best", "tokens/s",
                                                           "samples/s", "peak MB", "wall s"])
    best_of = {}
    for m in metrics:
        vals = [r["final"][m] for r in runs if isinstance(r["final"].get(m), (int, float))]
        if vals:
            lower = m in ("loss", "perplexity") or m.endswith("loss")
            best_of[m] = min(vals) if lower else max(vals)
    body = ""
    for r in runs:
        cells = [f"<th>{html.escape(r['name'])}</th>", f"<td>{html.escape(str(r['status']))}</td>", f"<td class=num>{r['steps']}</td>"]
        for m in metrics:
            v = r["final"].get(m)
            mark = " class='num top'" if m in best_of and v == best_of[m] and len(runs) > 1 else " class=num"
            cells.append(f"<td{mark}>{html.escape(_num(v))}</td>")
        b = r["best"]
        best = f"{b['metric']} {_num(b['value'])} at step {b['step']}" if b.get("metric") else "–"
        cells.append(f"<td>{html.escape(best)}</td>")
        cells += [f"<td class=num>{html.escape(_num(r[k]))}</td>" for k in SPEED_KEYS]
        body += f"<tr>{''.join(cells)}</tr>"
    return f"<table><tr>{head}</tr>{body}</table>"


def _config_table(result: dict) -> str:
    diffs = result["config_differences"]
    names = [r["name"] for r in result["runs"]]
    if not diffs:
        return "<p>every config key has the same value in every run</p>"
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    body = ""
    for k, by_run in diffs.items():
        first = json.dumps(by_run.get(names[0]), default=str)
        cells = "".join(f"<td class='{'diff' if json.dumps(by_run.get(n), default=str) != first else ''}'>"
                        f"{html.escape(_num(by_run.get(n)))}</td>" for n in names)
        body += f"<tr><th>{html.escape(k)}</th>{cells}</tr>"
    return f"<table><tr><th>key (only those that differ)</th>{head}</tr>{body}</table>"


def compare_page(result: dict) -> str:
    from tunelab.analysis.report import CSS

    runs = result["runs"]
    full = "".join(f"<details><summary>{html.escape(r['name'])}: config.yaml</summary><pre>"
                   + html.escape("\n".join(f"{k}: {v}" for k, v in r["_config"].items())) + "</pre></details>" for r in runs)
    return "\n".join([
        "<!doctype html><html lang=en><meta charset='utf-8'><title>tunelab compare</title>",
        f"<style>{CSS}td.diff{{background:#fff3c4;font-weight:600}}td.top{{background:#e3f4e4;font-weight:600}}</style><body>",
        f"<h1>{len(runs)} runs compared</h1><p class=sub>" + " · ".join(html.escape(r["run_dir"]) for r in runs) + "</p>",
        "<h2>results</h2>", _table(result), "<h2>config differences</h2>", _config_table(result),
        f"<h2>curves</h2><div class=grid>{''.join(_figures(result))}</div>", "<h2>configs</h2>", full, "</body></html>"])


def write_compare(paths: list[Path], output: Path | None) -> dict:
    """`tunelab compare`: the comparison (JSON-ready), and the page written to `output` when given."""
    result = compare_runs(paths)
    out = public(result)
    if output is not None:
        output = Path(output)
        if output.is_dir():
            raise InputError("is a folder; give the page's file name (e.g. compare.html)", file=output)
        if not output.parent.exists():
            raise InputError("the folder for the page does not exist", file=output)
        output.write_text(compare_page(result), encoding="utf-8")
        out["page"] = str(output)
    return out
