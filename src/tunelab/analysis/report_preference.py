"""report.html's preference section (task: preference): the train rows' rewards, margin, accuracy,
log-probs and log-ratio to the reference, each panel with the held-out pairs' values on top
(eval_*, the untouched model's first). One quantity per panel, steps on x, as the other plots."""

from __future__ import annotations

import html

from tunelab.analysis.plots import overlay_figure, series, to_png

PANELS = (  # (title, y label, keys: train key -> held-out key is eval_ + it)
    ("implicit rewards", "reward", ("reward_chosen", "reward_rejected")),
    ("reward margin (chosen - rejected)", "reward", ("reward_margin",)),
    ("preference accuracy", "share of pairs", ("pref_accuracy",)),
    ("answer log-probs per token", "nats / token", ("logp_chosen", "logp_rejected")),
    ("log-ratio to the reference per token (kl_ref)", "nats / token", ("kl_ref",)),
)


def preference_section(rows: list[dict]) -> str | None:
    """The section's HTML, or None when the rows are not a preference run's."""
    if not any("reward_margin" in r or "eval_reward_margin" in r for r in rows):
        return None
    figures = []
    for title, ylabel, keys in PANELS:
        curves = []
        for key in keys:
            curves += [(f"{key} (train)", series(rows, key)), (f"{key} (held-out)", series(rows, f"eval_{key}"))]
        fig = overlay_figure(title, ylabel, [c for c in curves if c[1]] or curves, style=".-")
        if fig is not None:
            name = f"preference_{keys[0]}"
            figures.append(f"<figure><img class='plot' data-plot='{html.escape(name)}' alt='{html.escape(title)}' "
                           f"src='data:image/png;base64,{to_png(fig)}'></figure>")
    if not figures:
        return None
    return ("<h2>preference</h2><p class=sub>train rows: the means since the previous row; held-out: every "
            "evaluation, the untouched model first (margin 0 there: policy = reference)</p>"
            f"<div class=grid>{''.join(figures)}</div>")
