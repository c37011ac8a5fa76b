"""`tunelab compare`: three runs (and a sweep folder) side by side; only differing config keys listed."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from test_report import fake_run
from tunelab.cli import app
import pytest

pytestmark = pytest.mark.e2e

runner = CliRunner()


def sweep(tmp_path):
    root = tmp_path / "sweep"
    for name, lr, diverged in (("lr1e-3", "0.001", False), ("lr3e-3", "0.003", False), ("lr1e-1", "0.1", True)):
        run = fake_run(root / name, diverged=diverged)
        (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("lr: 0.001", f"lr: {lr}"))
        summary = json.loads((run / "summary.json").read_text())
        summary.update({"tokens_per_second": 100.0 * len(name), "peak_memory_mb": 500.0 + len(lr)})
        (run / "summary.json").write_text(json.dumps(summary))
    return root


def test_compare_three_runs_as_json_and_a_page(tmp_path):
    root = sweep(tmp_path)
    runs = [str(root / n) for n in ("lr1e-3", "lr3e-3", "lr1e-1")]
    page = tmp_path / "cmp.html"
    res = runner.invoke(app, ["compare", *runs, "-o", str(page), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert [r["name"] for r in out["runs"]] == ["lr1e-3", "lr3e-3", "lr1e-1"]
    assert out["config_differences"] == {"optim.lr": {"lr1e-3": 0.001, "lr3e-3": 0.003, "lr1e-1": 0.1}}
    assert [r["status"] for r in out["runs"]] == ["completed", "completed", "diverged"]
    assert out["runs"][0]["final"]["accuracy"] == 0.9 and out["runs"][2]["final"] == {}
    assert [r["tokens_per_second"] for r in out["runs"]] == [600.0, 600.0, 600.0]
    html = page.read_text()
    assert html.count("<img class='plot'") >= 6 and "class='diff'" in html and "optim.lr" in html
    assert "train.max_grad_norm" not in html.split("<h2>configs</h2>")[0]  # equal keys folded away
    assert "https://" not in html and "http://" not in html


def test_a_sweep_folder_is_its_runs_and_the_terminal_table(tmp_path):
    res = runner.invoke(app, ["compare", str(sweep(tmp_path))])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0].split()[:3] == ["run", "status", "steps"]
    assert [ln.split()[0] for ln in lines[1:4]] == ["lr1e-1", "lr1e-3", "lr3e-3"]  # name order
    assert "config differences:" in res.stdout and "optim.lr: lr1e-1=0.1, lr1e-3=0.001, lr3e-3=0.003" in res.stdout


def test_compare_bad_input_is_one_line_exit_2(tmp_path):
    (tmp_path / "empty").mkdir()
    for args in (["compare", str(tmp_path / "missing")], ["compare", str(tmp_path / "empty")]):
        res = runner.invoke(app, args)
        assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1, res.output
