"""report.html as a person sees it: rendered in real headless Chromium, plots present and not blank;
the figures' axes checked directly (a diverged run's loss axis stays numeric)."""

from __future__ import annotations

import html
import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest

from tunelab.analysis import plots
from tunelab.analysis.report import render_report, write_report

pytestmark = pytest.mark.unit

CHROMIUM = next((p for p in (shutil.which(n) for n in ("chromium-headless-shell", "chromium", "chromium-browser",
                                                       "google-chrome")) if p), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no headless Chromium on this machine "
                                    "(.ci/run installs chromium-headless-shell with apt-get)")

PROBE = """<script>
window.addEventListener('load', () => {
  const plots = [...document.querySelectorAll('img.plot')].map(img => {
    const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
    const g = c.getContext('2d'); g.drawImage(img, 0, 0);
    const d = g.getImageData(0, 0, Math.max(1, c.width), Math.max(1, c.height)).data;
    let ink = 0, chroma = 0, colours = new Set();
    for (let i = 0; i < d.length; i += 4) {
      if (d[i] < 215 || d[i + 1] < 215 || d[i + 2] < 215) ink++;
      if (Math.max(d[i], d[i + 1], d[i + 2]) - Math.min(d[i], d[i + 1], d[i + 2]) > 40) chroma++;  // data, not axes
      if (i % 64 === 0) colours.add((d[i] >> 4) * 256 + (d[i + 1] >> 4) * 16 + (d[i + 2] >> 4));
    }
    const r = img.getBoundingClientRect();
    return {name: img.dataset.plot, complete: img.complete, natural: img.naturalWidth, shown: r.width,
            ink: ink / (d.length / 4), chroma: chroma / (d.length / 4), colours: colours.size};
  });
  const pre = document.createElement('pre'); pre.id = 'probe';
  pre.textContent = JSON.stringify({plots, scroll: document.documentElement.scrollWidth,
                                               folded: document.querySelector('details pre') !== null &&
                                                       !document.querySelector('details').open});
  document.body.appendChild(pre);
});
</script>"""


def fake_run(root: Path, *, diverged: bool) -> Path:
    """A finished (or diverged) classification run dir with every kind of row the report draws."""
    root.mkdir(parents=True)
    (root / "config.yaml").write_text("task: classification\nmodel: {name: minilm}\noptim: {lr: 0.001}\n"
                                      "train: {max_grad_norm: 1.0}\n")
    (root / "param_groups.json").write_text(json.dumps([
        {"name": "embeddings", "lr": 5e-4, "weight_decay": 0.01, "n_params": 100},
        {"name": "embeddings.no_decay", "lr": 5e-4, "weight_decay": 0.0, "n_params": 10},
        {"name": "head", "lr": 1e-3, "weight_decay": 0.01, "n_params": 20}]))
    rows = [{"step": 0, "epoch": 0, "eval_loss": 0.7, "eval_accuracy": 0.5, "eval_rows": 40, "before_training": True}]
    loss = 0.7
    for s in range(1, 41):
        loss = loss * 0.97 if not diverged or s < 20 else loss * 30
        value = loss if not diverged or s < 32 else ("inf" if s < 36 else "nan")
        rows.append({"step": s, "epoch": s / 20, "loss": value, "lr": 1e-3 * (1 - s / 41), "grad_norm": 0.5 + s / 40,
                     "grad_norm_max": 0.6 + s / 40, "tokens": 120 * s, "samples": 8 * s, "elapsed": 0.3 * s,
                     "memory_mb": 400 + s})
        if s % 10 == 0:
            rows.append({"step": s, "epoch": s / 20, "eval_loss": loss if math.isfinite(loss) else "inf",
                         "eval_accuracy": 0.5 + s / 100, "eval_macro_f1": 0.4 + s / 100, "eval_rows": 40})
    rows.append({"step": 25, "event": "health", "kind": "loss_spike", "message": "loss jumped"})
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    final = {"loss": 0.3, "accuracy": 0.9, "macro_f1": 0.89, "labels": ["neg", "pos", "neutral"],
             "confusion_matrix": [[12, 1, 1], [2, 10, 0], [1, 1, 12]],
             "per_class": {"neg": {"precision": 0.8, "recall": 0.86, "support": 14}}}
    summary = {"status": "diverged" if diverged else "completed", "task": "classification", "method": "full",
               "steps": 40, "total_steps": 40, "precision": "fp32", "device": "cpu", "skipped_steps": 5 if diverged else 0,
               "loggers": {"tensorboard": "ok", "mlflow": "failed: tracking server unreachable"},
               "before": {"eval_loss": 0.7, "eval_accuracy": 0.5}, **({} if diverged else {"final": final})}
    (root / "summary.json").write_text(json.dumps(summary))
    return root


def chromium_probe(page: Path, tmp: Path) -> dict:
    probed = tmp / "probed.html"
    probed.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    out = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,2000",
                          "--virtual-time-budget=15000", "--dump-dom", probed.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert '<pre id="probe">' in out.stdout, out.stderr[-2000:]
    text = out.stdout.split('<pre id="probe">')[1].split("</pre>")[0]
    return json.loads(html.unescape(text))


@needs_chromium
@pytest.mark.parametrize("diverged", [False, True])
def test_report_renders_in_headless_chromium_with_every_plot_present_and_not_blank(tmp_path, diverged):
    run = fake_run(tmp_path / "run", diverged=diverged)
    page = write_report(run, drift=False)
    _, contents = render_report(run, drift=False)
    expected = ["loss", "lr", "grad_norm", "throughput", "memory", "eval_accuracy", "eval_macro_f1"]
    expected += [] if diverged else ["confusion_matrix"]
    assert contents["plots"] == expected
    probe = chromium_probe(page, tmp_path)
    assert [p["name"] for p in probe["plots"]] == expected
    for p in probe["plots"]:
        assert p["complete"] and p["natural"] >= 600, p  # decoded, at a resolution that stays crisp
        assert 300 <= p["shown"] <= 1240, p  # two per row at 1280 px, none wider than the page
        assert 0.01 < p["ink"] < 0.6 and p["colours"] >= 4, p  # drawn on, not blank, not a solid block
        assert p["chroma"] > 0.002, p  # coloured data drawn, not only black axes and labels
    assert probe["scroll"] <= 1280  # nothing forces a horizontal scroll at 1280 px
    assert probe["folded"]  # the config sits in a closed <details>
    text = page.read_text()
    assert "http://" not in text.replace("http://www.w3.org", "") and "https://" not in text  # self-contained
    assert "logger mlflow failed: tracking server unreachable" in text


def test_a_diverged_runs_loss_axis_is_numeric_log_and_marks_the_non_finite_points():
    import matplotlib.category

    rows = [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 6113736521.6}, {"step": 3, "loss": 1.8e19},
            {"step": 4, "loss": "inf"}, {"step": 5, "loss": "nan"}, {"step": 5, "eval_loss": "inf"}]
    fig = plots.loss_figure(rows)
    ax = fig.axes[0]
    assert not isinstance(ax.yaxis.get_converter(), matplotlib.category.StrCategoryConverter)
    assert ax.get_yscale() == "log"
    train = next(line for line in ax.get_lines() if line.get_label() == "train loss")
    assert list(train.get_ydata()) == [2.5, 6113736521.6, 1.8e19]  # numbers, in order, at their own height
    marks = [line for line in ax.get_lines() if line.get_label().startswith("non-finite")]
    assert len(marks) == 1 and list(marks[0].get_xdata()) == [4, 5]  # one mark per step, nan and inf
    lo, hi = ax.get_ylim()
    assert lo <= 2.5 and hi >= 1.8e19


def test_a_small_range_stays_linear_and_constant_counts_get_no_panel():
    rows = [{"step": s, "loss": 1.0 - s / 100} for s in range(1, 11)]
    rows += [{"step": s, "eval_loss": 0.9, "eval_perplexity": 30 - s, "eval_supervised_tokens": 1234} for s in (5, 10)]
    assert plots.loss_figure(rows).axes[0].get_yscale() == "linear"
    keys, constant = plots.eval_metric_keys(rows)
    assert keys == ["eval_perplexity"] and constant == {"eval_supervised_tokens": 1234}


def test_lr_is_drawn_per_parameter_group_and_grad_norm_with_the_clip_threshold():
    rows = [{"step": s, "loss": 1.0, "lr": 1e-3 * s / 4, "grad_norm": 2.0 * s} for s in range(1, 5)]
    groups = [{"name": "block_0", "lr": 5e-4, "n_params": 10}, {"name": "block_0.no_decay", "lr": 5e-4, "n_params": 2},
              {"name": "head", "lr": 2e-3, "n_params": 4}]
    ax = plots.lr_figure(rows, groups, base_lr=1e-3).axes[0]
    lines = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}
    assert lines == {"block_0 (12 params)": pytest.approx([1.25e-4, 2.5e-4, 3.75e-4, 5e-4]),
                     "head (4 params)": pytest.approx([5e-4, 1e-3, 1.5e-3, 2e-3])}
    ax = plots.grad_norm_figure(rows, clip=1.0).axes[0]
    clip = next(line for line in ax.get_lines() if line.get_label().startswith("clip threshold"))
    assert list(clip.get_ydata()) == [1.0, 1.0]
