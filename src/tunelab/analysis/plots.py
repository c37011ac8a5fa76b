"""The report's figures: one quantity per axis, drawn with matplotlib, embedded as PNG data URIs.

Why matplotlib: it is already a dependency, renders offline to static images that any browser,
mail client or CI artifact viewer shows identically with no JavaScript, and has first-class log
axes, heatmaps and markers. An interactive library (plotly, bokeh) would embed megabytes of
JavaScript per page to stay offline, for hover values the report's tables already give.

Every figure function takes plain data (metrics rows, a confusion matrix, drift layers) and returns
a `Figure` or None when there is nothing to draw, so tests can inspect the axes themselves.
metrics.jsonl stores non-finite floats as the strings "nan" / "inf" / "-inf"; `number` turns them
back into floats so a diverged run's axis stays numeric (never categorical), and the non-finite
points are drawn as marked points at the top edge of the axis instead.
"""

from __future__ import annotations

import base64
import io
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

WIDTH, HEIGHT, DPI = 6.4, 3.3, 150  # shown ~600 CSS px wide: two per row at 1280 px, crisp on 2x screens
LOG_RANGE = 50.0  # a positive series spanning more than this factor gets a log axis
HEALTH_COLOR, BAD_COLOR = "#d62728", "#9467bd"
plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "axes.titleweight": "bold", "axes.grid": True,
                     "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False})


def number(v) -> float | None:
    """A metrics value as a float: numbers as they are, "nan"/"inf"/"-inf" strings as non-finite floats."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str) and v.strip().lower() in ("nan", "inf", "-inf", "+inf", "infinity", "-infinity"):
        return float(v)
    return None


def series(rows: list[dict], key: str, *, skip_before: bool = False) -> list[tuple[int, float]]:
    """(step, value) for every row holding `key` as a number (non-finite included)."""
    out = []
    for r in rows:
        if skip_before and r.get("before_training"):
            continue
        v = number(r.get(key))
        if v is not None and "event" not in r:
            out.append((int(r.get("step", 0)), v))
    return out


def health_events(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("event") == "health"]


def figure(title: str, xlabel: str = "step", ylabel: str = "", height: float = HEIGHT) -> tuple[Figure, object]:
    fig, ax = plt.subplots(figsize=(WIDTH, height), dpi=DPI)
    ax.set_title(title, loc="left")
    ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    return fig, ax


def wants_log(values: list[float]) -> bool:
    finite = [v for v in values if math.isfinite(v)]
    return bool(finite) and min(finite) > 0 and max(finite) / min(finite) > LOG_RANGE


def plot_series(ax, pts: list[tuple[int, float]], label: str, style: str = "-", **kw) -> list[tuple[int, float]]:
    """Draw the finite points; return the non-finite ones (for `mark_non_finite`)."""
    good = [(s, v) for s, v in pts if math.isfinite(v)]
    if good:
        ax.plot([s for s, _ in good], [v for _, v in good], style, label=label, **kw)
    return [(s, v) for s, v in pts if not math.isfinite(v)]


def mark_non_finite(ax, bad: list[tuple[int, float]]) -> None:
    """Non-finite values as 'x' markers along the top edge, labelled with what they were."""
    if not bad:
        return
    bad = list({s: (s, v) for s, v in bad}.values())  # one mark per step
    top = ax.get_ylim()[1]
    ax.plot([s for s, _ in bad], [top] * len(bad), "x", color=BAD_COLOR, markersize=8, mew=2, clip_on=False,
            label=f"non-finite ({', '.join(sorted({str(v) for _, v in bad}))}) x{len(bad)}")


def mark_health(ax, events: list[dict], pts: list[tuple[int, float]]) -> None:
    """Health events as dotted lines and a triangle on the curve at the event's step, one legend entry per kind."""
    finite = {s: v for s, v in pts if math.isfinite(v)}
    seen = set()
    for e in events:
        step = int(e.get("step", 0))
        ax.axvline(step, color=HEALTH_COLOR, linestyle=":", alpha=0.5, linewidth=1)
        near = min(finite, key=lambda s: abs(s - step)) if finite else None
        if near is not None:
            kind = e.get("kind", "health")
            ax.plot([step], [finite[near]], "v", color=HEALTH_COLOR, markersize=7,
                    label=f"health: {kind}" if kind not in seen else None)
            seen.add(kind)


def finish(ax, log: bool, legend: bool = True) -> None:
    if log:
        ax.set_yscale("log")
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best", framealpha=0.85)


def loss_figure(rows: list[dict]) -> Figure | None:
    train, evals = series(rows, "loss"), series(rows, "eval_loss")
    if not train and not evals:
        return None
    fig, ax = figure("loss", ylabel="loss")
    bad = plot_series(ax, train, "train loss", color="#1f77b4", linewidth=1.4)
    bad += plot_series(ax, evals, "eval loss", "o-", color="#ff7f0e", markersize=4)
    log = wants_log([v for _, v in train + evals])
    if log:
        ax.set_yscale("log")
    mark_health(ax, health_events(rows), train or evals)
    mark_non_finite(ax, bad)
    finish(ax, False)
    return fig


def lr_figure(rows: list[dict], groups: list[dict] | None, base_lr: float | None) -> Figure | None:
    """The scheduled lr of every parameter group: the logged lr (optim.lr's schedule) x group lr / optim.lr."""
    pts = series(rows, "lr")
    if not pts:
        return None
    fig, ax = figure("learning rate per parameter group", ylabel="lr")
    groups = merge_groups(groups or [])
    if groups and base_lr:
        cmap = plt.get_cmap("viridis", max(2, len(groups)))
        named = set(range(len(groups))) if len(groups) <= 10 else {0, len(groups) // 2, len(groups) - 1}
        for i, g in enumerate(groups):
            ratio = g["lr"] / base_lr
            ax.plot([s for s, _ in pts], [v * ratio for _, v in pts], color=cmap(i), linewidth=1.3,
                    label=f"{g['name']} ({g['n_params']:,} params)" if i in named else None)
    else:
        ax.plot([s for s, _ in pts], [v for _, v in pts], label="lr")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    finish(ax, False)
    return fig


def lr_find_figure(found: dict | None) -> Figure | None:
    """optim.lr: auto / `tunelab lr-find`: the range test's loss (raw and smoothed) over the swept lr, with
    the chosen lr, the smoothed minimum and the steepest descent marked (RUN/lr_find.json)."""
    curve = (found or {}).get("curve") or []
    if len(curve) < 2:
        return None
    fig, ax = figure("learning-rate range test", xlabel="lr (log scale)", ylabel="training loss")
    lrs = [c["lr"] for c in curve]
    ax.plot(lrs, [c["loss"] for c in curve], color="#9ecae1", linewidth=1.0, label="loss per step")
    ax.plot(lrs, [c["smoothed"] for c in curve], color="#1f77b4", linewidth=1.6, label="smoothed")
    for key, style, label in (("lr", "-", "chosen"), ("lr_min", ":", "smoothed minimum"),
                              ("lr_steepest", "--", "steepest descent")):
        if isinstance(found.get(key), (int, float)):
            ax.axvline(found[key], linestyle=style, color="#d62728" if key == "lr" else "#7f7f7f",
                       label=f"{label} {found[key]:.2g}")
    ax.set_xscale("log")
    finish(ax, False)
    return fig


def merge_groups(groups: list[dict]) -> list[dict]:
    """One entry per lr: a group and its `.no_decay` twin (same lr, no weight decay) are drawn as one line."""
    out: dict[tuple, dict] = {}
    for i, g in enumerate(groups):
        name = str(g.get("name", i)).removesuffix(".no_decay")
        key = (name, g.get("lr"))
        if key in out:
            out[key]["n_params"] += g.get("n_params", 0)
        else:
            out[key] = {"name": name, "lr": g.get("lr"), "n_params": g.get("n_params", 0)}
    return [g for g in out.values() if isinstance(g["lr"], (int, float))]


def grad_norm_figure(rows: list[dict], clip: float | None) -> Figure | None:
    pts = series(rows, "grad_norm")
    if not pts:
        return None
    fig, ax = figure("gradient norm (before clipping)", ylabel="L2 norm")
    bad = plot_series(ax, pts, "grad norm (last step of each row)", color="#2ca02c", linewidth=1.3)
    peak = series(rows, "grad_norm_max")
    if peak and any(abs(a[1] - b[1]) > 1e-12 for a, b in zip(peak, pts)):
        bad += plot_series(ax, peak, "max since the previous row", color="#2ca02c", alpha=0.35, linewidth=1)
    if clip:
        ax.axhline(clip, color="black", linestyle="--", linewidth=1, label=f"clip threshold {clip:g}")
    log = wants_log([v for _, v in pts + peak] + ([clip] if clip else []))
    if log:
        ax.set_yscale("log")
    mark_health(ax, health_events(rows), pts)
    mark_non_finite(ax, bad)
    finish(ax, False)
    return fig


def rates(rows: list[dict], key: str) -> list[tuple[int, float]]:
    """`key` per second of training between consecutive training rows (from their running totals)."""
    train = [r for r in rows if "loss" in r and number(r.get("elapsed")) is not None and number(r.get(key)) is not None]
    out = []
    for a, b in zip(train, train[1:]):
        dt = number(b["elapsed"]) - number(a["elapsed"])
        if dt > 0 and number(b[key]) >= number(a[key]):
            out.append((int(b["step"]), (number(b[key]) - number(a[key])) / dt))
    return out


def throughput_figure(rows: list[dict]) -> Figure | None:
    tokens = rates(rows, "tokens")
    if not tokens:
        return None
    fig, ax = figure("throughput", ylabel="tokens / s")
    ax.plot([s for s, _ in tokens], [v for _, v in tokens], color="#8c564b", linewidth=1.3, label="tokens/s")
    ax.set_ylim(bottom=0)
    finish(ax, False, legend=False)
    return fig


def memory_figure(rows: list[dict]) -> Figure | None:
    pts = series(rows, "memory_mb")
    if not pts:
        return None
    fig, ax = figure("memory", ylabel="MB")
    ax.plot([s for s, _ in pts], [v for _, v in pts], color="#e377c2", linewidth=1.3)
    ax.set_ylim(bottom=0)
    finish(ax, False, legend=False)
    return fig


# of the generation measures (eval_gen_*), these get a panel; the rest are in the generations section
GEN_PANELS = ("eval_gen_stop_rate", "eval_gen_chrf", "eval_gen_rouge_l", "eval_gen_cross_similarity",
              "eval_gen_repeated_4gram_share")


def eval_metric_keys(rows: list[dict]) -> tuple[list[str], dict[str, float]]:
    """The eval metrics worth a panel (eval_loss is on the loss panel), and the constant ones with their value."""
    keys = list(dict.fromkeys(k for r in rows for k in r if k.startswith("eval_") and k != "eval_loss"
                              and (not k.startswith("eval_gen_") or k in GEN_PANELS)))
    varying, constant = [], {}
    for k in keys:
        values = [v for _, v in series(rows, k)]
        if not values:
            continue
        # a count that never changes (eval_rows, eval_supervised_tokens) is a fact, not a curve
        if len(values) > 1 and len(set(values)) == 1 and math.isfinite(values[0]) and values[0] == int(values[0]) \
                and abs(values[0]) > 1:
            constant[k] = values[0]
        else:
            varying.append(k)
    return varying, constant


def eval_metric_figure(rows: list[dict], key: str) -> Figure | None:
    before = [(int(r.get("step", 0)), number(r[key])) for r in rows if r.get("before_training") and number(r.get(key)) is not None]
    pts = series(rows, key, skip_before=True)
    if not pts and not before:
        return None
    name = key.removeprefix("eval_")
    fig, ax = figure(f"eval {name}", ylabel=name, height=2.8)
    bad = plot_series(ax, pts, name, "o-", color="#ff7f0e", markersize=4)
    if before:
        ax.plot([s for s, _ in before], [v for _, v in before], "s", color="gray", markersize=7, label="before training")
    mark_non_finite(ax, bad)
    finish(ax, wants_log([v for _, v in pts + before]) and name in ("perplexity",))
    return fig


def confusion_figure(matrix: list[list[int]], labels: list[str]) -> Figure | None:
    if not matrix or not labels:
        return None
    n = len(labels)
    size = min(7.5, max(3.6, 0.5 * n + 2.2))
    fig, ax = plt.subplots(figsize=(size + 1.0, size), dpi=DPI)
    totals = [max(1, sum(row)) for row in matrix]
    share = [[v / t for v in row] for row, t in zip(matrix, totals)]
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.grid(False)
    ax.set_xticks(range(n), labels, rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("predicted"), ax.set_ylabel("true")
    ax.set_title("confusion matrix", loc="left")
    if n <= 20:
        for i, row in enumerate(matrix):
            for j, v in enumerate(row):
                ax.text(j, i, str(v), ha="center", va="center", fontsize=9 if n <= 10 else 7,
                        color="white" if share[i][j] > 0.55 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    return fig


def drift_figure(layers: list[dict]) -> Figure | None:
    """Relative change per layer, in model order (embeddings at the top, the head at the bottom)."""
    pts = [(r["layer"], number(r.get("relative_change"))) for r in layers]
    pts = [(name, v) for name, v in pts if v is not None]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(WIDTH * 1.6, max(2.4, 0.28 * len(pts) + 1.0)), dpi=DPI)
    finite = [v for _, v in pts if math.isfinite(v)]
    top = max(finite, default=1.0) or 1.0
    values = [v if math.isfinite(v) else top for _, v in pts]
    colors = ["#1f77b4" if math.isfinite(v) else BAD_COLOR for _, v in pts]
    ax.barh(range(len(pts)), values, color=colors)
    ax.set_yticks(range(len(pts)), [name for name, _ in pts], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("relative change ‖W − W₀‖ / ‖W₀‖")
    ax.set_title("weight drift per layer", loc="left")
    ax.grid(axis="y", visible=False)
    return fig


def to_png(fig: Figure) -> str:
    """The figure as a base64 PNG (closed afterwards)."""
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def overlay_figure(title: str, ylabel: str, curves: list[tuple[str, list[tuple[int, float]]]],
                   style: str = "-") -> Figure | None:
    """Several runs' series of one quantity on one axis (tunelab compare)."""
    if not any(pts for _, pts in curves):
        return None
    fig, ax = figure(title, ylabel=ylabel)
    bad = []
    for i, (name, pts) in enumerate(curves):  # run i keeps colour Ci in every panel, drawn or not
        bad += plot_series(ax, pts, name, style, color=f"C{i % 10}", linewidth=1.3, markersize=4)
    if wants_log([v for _, pts in curves for _, v in pts]):
        ax.set_yscale("log")
    mark_non_finite(ax, bad)
    finish(ax, False)
    return fig


def bar_figure(title: str, xlabel: str, values: list[tuple[str, float]]) -> Figure | None:
    """One bar per run (tunelab compare: speed, memory)."""
    values = [(n, v) for n, v in values if v is not None and math.isfinite(v)]
    if not values:
        return None
    fig, ax = plt.subplots(figsize=(WIDTH, max(1.8, 0.35 * len(values) + 1.0)), dpi=DPI)
    ax.barh(range(len(values)), [v for _, v in values], color="#1f77b4")
    ax.set_yticks(range(len(values)), [n for n, _ in values])
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title, loc="left")
    ax.grid(axis="y", visible=False)
    return fig
