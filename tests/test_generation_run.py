"""Generation during training, end to end on a tiny Llama: the untouched model first, the shipped
weights last, the health events a looping fine-tune raises, generations.json, the probe's
generative view, and `tunelab eval` on the run dir."""

from __future__ import annotations

import json

import yaml
from typer.testing import CliRunner

from conftest import write_jsonl
from tiny_models import conversations, tiny_llama_folder
from tunelab.cli import app

import pytest

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_llama_folder(tmp_path_factory.mktemp("llama"))


def _config(tmp_path, model, train_rows, **extra) -> dict:
    write_jsonl(tmp_path / "train.jsonl", train_rows)
    write_jsonl(tmp_path / "eval.jsonl", conversations(6))
    cfg = {"task": "chat", "model": {"name": str(model), "max_length": 64},
           "data": {"train": str(tmp_path / "train.jsonl"), "eval": str(tmp_path / "eval.jsonl")},
           "optim": {"lr": 1e-2}, "schedule": {"name": "constant", "warmup_steps": 0},
           "train": {"epochs": 3, "batch_size": 4, "log_every": 2, "seed": 1},
           "early_stopping": {"enabled": False}, "checkpoint": {"final": "last"},
           "eval": {"generate": {"n": 4, "max_new_tokens": 12, "batch_size": 4}}}
    return _merge(cfg, extra)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _train(tmp_path, cfg):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    run = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", str(path), "--output-dir", str(run), "--no-progress"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return run, json.loads((run / "summary.json").read_text()), rows


def looping_rows(n: int) -> list[dict]:
    """Every answer is the same word 24 times: a fine-tune on it loops and never ends a turn in 12 tokens."""
    return [{"messages": [r["messages"][0], {"role": "assistant", "content": " ".join(["sea"] * 24)}]}
            for r in conversations(n)]


def test_a_looping_fine_tune_is_flagged_and_recorded(tmp_path, llama):
    probe = tmp_path / "probe.txt"
    probe.write_text("the sky is blue and the sea is wide\n\nfish live in water and cats have four legs\n")
    run, summary, rows = _train(tmp_path, _config(tmp_path, llama, looping_rows(16),
                                                  probe={"data": str(probe), "generate_n": 2}))
    before = summary["before"]
    assert "eval_gen_stop_rate" in before and "eval_gen_chrf" in before  # the untouched model, first
    after = summary["generation"]["after"]["greedy"]
    assert after["loop_rate"] >= 0.5 and after["stop_rate"] == 0.0 and after["cross_similarity"] > 0.5
    assert summary["final"]["gen_loop_rate"] == after["loop_rate"]
    kinds = {r["kind"] for r in rows if r.get("event") == "health"}
    assert {"never_stops", "mode_collapse", "repetition"} <= kinds
    assert {"never_stops", "mode_collapse", "repetition"} <= set(summary["health"]["counts"])
    final_row = next(r for r in rows if r.get("final_generation"))
    assert final_row["eval_gen_loop_rate"] == after["loop_rate"] and final_row["step"] == summary["steps"]
    record = json.loads((run / "generations.json").read_text())
    labels = [e["label"] for e in record["eval"]["evaluations"]]
    assert labels == ["before", "final"]  # every: end
    replies = record["eval"]["evaluations"][-1]["replies"]["greedy"]
    assert all(set(r) <= set("sea ") for r in replies)  # the one answer it learned, for every prompt
    pg = summary["probe"]["generation"]
    assert pg["greedy"]["loop_rate"]["after"] is not None and "chrf_vs_before" in pg["greedy"]
    assert [e["label"] for e in record["probe"]["evaluations"]] == ["before", "final"]
    report = (run / "report.html").read_text()
    assert "generations: base vs fine-tuned" in report and "never_stops" in report

    res = CliRunner().invoke(app, ["eval", str(run), "--data", str(tmp_path / "eval.jsonl"), "--json", "--n", "2",
                                   "--max-new-tokens", "12"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert out["model"].endswith("final") and out["generation"]["greedy"]["stop_rate"] == 0.0


def test_every_eval_generates_at_each_evaluation(tmp_path, llama):
    cfg = _config(tmp_path, llama, conversations(8), train={"epochs": 2}, eval={"generate": {"every": "eval", "n": 2}})
    run, summary, rows = _train(tmp_path, cfg)
    evals = [r for r in rows if "eval_loss" in r]
    assert len(evals) == 3 and all("eval_gen_stop_rate" in r for r in evals)  # before + 2 epochs
    labels = [e["label"] for e in json.loads((run / "generations.json").read_text())["eval"]["evaluations"]]
    assert labels == ["before", "eval", "eval", "final"]


def test_generation_off(tmp_path, llama):
    run, summary, rows = _train(tmp_path, _config(tmp_path, llama, conversations(8), train={"epochs": 1},
                                                  eval={"generate": {"n": 0}}))
    assert "generation" not in summary and not (run / "generations.json").exists()
    assert not any("eval_gen_stop_rate" in r for r in rows)


def test_a_missing_prompts_file_is_one_line_and_leaves_nothing(tmp_path, llama):
    cfg = _config(tmp_path, llama, conversations(4), eval={"generate": {"prompts": "nope.jsonl"}})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    res = CliRunner().invoke(app, ["train", str(path), "--output-dir", str(tmp_path / "run"), "--no-progress"])
    assert res.exit_code == 2 and "eval.generate.prompts" in res.output and "nope.jsonl" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "run").exists()
