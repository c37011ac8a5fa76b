"""CLI polish: help without <bool>, one -o/--output, --version, errors as JSON under --json, did-you-mean
for keys and models (other tools' names too), config --list, init, --resume auto on a finished run,
train --json, the logger status in summary.json, the final line and the model card."""

from __future__ import annotations

import copy
import json
import sys
import types
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.config import Config, load_config

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: a second thread only adds contention


def all_commands():
    from typer.main import get_command

    root = get_command(app)
    out = []
    for name, cmd in root.commands.items():
        subs = getattr(cmd, "commands", None)
        out += [[name, sub] for sub in subs] if subs else [[name]]
    return out


@pytest.mark.parametrize("verb", all_commands(), ids=lambda v: " ".join(v))
@pytest.mark.e2e
def test_help_has_no_bool_metavar_and_output_is_spelled_one_way(verb):
    res = runner.invoke(app, [*verb, "--help"])
    assert res.exit_code == 0, res.output
    assert "<bool>" not in res.output
    if "--out " in res.output or "--output-dir" in res.output or "--output" in res.output:
        assert "-o, --output" in res.output  # the primary spelling, old ones kept as aliases


@pytest.mark.e2e
def test_version():
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.stdout.startswith("tunelab ") and "torch" in res.stdout


def write_config(tmp_path: Path, raw: dict, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("where, key, meant", [
    ((), "learning_rate", "optim.lr"),
    (("train",), "per_device_train_batch_size", "train.batch_size"),
    (("model",), "sequence_len", "model.max_length"),
    ((), "sequence_len", "model.max_length"),
    (("optim",), "lrr", "optim.lr"),
    (("optim",), "learnig_rate", "optim.lr"),
])
@pytest.mark.e2e
def test_unknown_keys_say_what_was_meant_and_where_keys_are_listed(toy_classification, tmp_path, where, key, meant):
    raw = copy.deepcopy(toy_classification["config"])
    node = raw
    for part in where:
        node = node.setdefault(part, {})
    node[key] = 1
    cfg = write_config(tmp_path, raw)
    res = runner.invoke(app, ["train", str(cfg), "-o", str(tmp_path / "run"), "--json"])
    assert res.exit_code == 2, res.output
    line = res.stderr.strip()
    assert "\n" not in line and f"did you mean {meant}?" in line and "tunelab config --list" in line
    assert f"{cfg}:" in line and f"field '{'.'.join((*where, key))}'" in line
    error = json.loads(res.stdout)["error"]  # under --json: the same error as JSON on stdout
    assert error["kind"] == "input" and error["exit_code"] == 2 and error["field"] == ".".join((*where, key))
    assert error["file"] == str(cfg) and isinstance(error["line"], int)
    assert not (tmp_path / "run").exists()


@pytest.mark.e2e
def test_an_unknown_model_name_suggests_the_embedded_one(toy_classification, tmp_path):
    raw = copy.deepcopy(toy_classification["config"])
    raw["model"]["name"] = "SmolLM2-135M-Instruct"
    res = runner.invoke(app, ["train", str(write_config(tmp_path, raw)), "-o", str(tmp_path / "run")])
    assert res.exit_code == 2 and "did you mean smollm2-135m-instruct?" in res.stderr, res.output
    assert "field 'model.name'" in res.stderr and not (tmp_path / "run").exists()


@pytest.mark.e2e
def test_config_list_names_every_section_and_key():
    res = runner.invoke(app, ["config", "--list", "--json"])
    keys = {k["key"]: k for k in json.loads(res.stdout)["keys"]}
    assert keys["optim.lr"]["default"] == Config.model_fields["optim"].default.lr
    assert {"train.batch_size", "model.max_length", "monitor.loggers_required", "lora.r"} <= set(keys)
    text = runner.invoke(app, ["config", "--list"]).stdout
    assert "optim.lr" in text and "monitor.loggers_required" in text
    res = runner.invoke(app, ["config", "--key", "optm"])
    assert res.exit_code == 2 and "did you mean optim?" in res.stderr


@pytest.mark.parametrize("task", ["classification", "chat", "causal_lm"])
@pytest.mark.e2e
def test_init_writes_a_commented_starter_that_loads(tmp_path, task):
    out = tmp_path / f"{task}.yaml"
    res = runner.invoke(app, ["init", task, "-o", str(out)])
    assert res.exit_code == 0, res.output
    text = out.read_text()
    assert text.startswith(f"# tunelab train {out}") and text.count("#") > 10
    for name in ("train.jsonl", "eval.jsonl", "corpus.txt"):
        (tmp_path / name).write_text("")
    cfg = load_config(out)
    assert cfg.task == task and cfg.model.name in ("minilm", "smollm2-135m-instruct")
    again = runner.invoke(app, ["init", task, "-o", str(out)])
    assert again.exit_code == 2 and "--force" in again.stderr


def finished_run(root: Path) -> Path:
    root.mkdir()
    (root / "summary.json").write_text(json.dumps({"status": "completed", "steps": 16, "run_dir": str(root)}))
    (root / "report.html").write_text("<!doctype html>")
    return root


@pytest.mark.e2e
def test_resume_auto_on_a_finished_run_exits_0_saying_it_is_done(toy_classification, tmp_path):
    cfg = write_config(tmp_path, toy_classification["config"])
    run = finished_run(tmp_path / "run")
    res = runner.invoke(app, ["train", str(cfg), "-o", str(run), "--resume", "auto"])
    assert res.exit_code == 0 and "already finished (completed, 16 steps); nothing to resume" in res.output
    res = runner.invoke(app, ["train", str(cfg), "-o", str(run), "--resume", "auto", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["status"] == "completed"


class FailingMlflow:
    """An MLflow stand-in whose tracking server is down."""

    def module(self):
        def start_run(run_id=None, run_name=None):
            raise ConnectionError("tracking server unreachable at http://mlflow:5000")
        return types.SimpleNamespace(set_experiment=lambda name: None, start_run=start_run)


@pytest.mark.e2e
def test_train_json_logger_failure_recorded_and_the_model_card(toy_classification, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", FailingMlflow().module())
    raw = copy.deepcopy(toy_classification["config"])
    raw["train"].update({"epochs": 1, "max_steps": 2})
    raw["monitor"] = {"loggers": ["tensorboard", "mlflow"]}
    run = tmp_path / "run"
    res = runner.invoke(app, ["train", str(write_config(tmp_path, raw)), "-o", str(run), "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)  # stdout is the JSON object alone; the display and the header are on stderr
    head = res.stderr.splitlines()
    assert head[0] == f"tunelab train · {run}" and head[1].split()[0] == "model" and "trainable of" in res.stderr
    assert "steps      2" in res.stderr and "64 train rows · 16 eval rows" in res.stderr
    assert any(ln.startswith("step 2/2  100%") and "eta 0:00:00" in ln for ln in head)  # piped: plain lines
    assert summary == json.loads((run / "summary.json").read_text())
    assert summary["loggers"] == {"tensorboard": "ok",
                                  "mlflow": "failed: tracking server unreachable at http://mlflow:5000"}
    assert "loggers tensorboard ok, mlflow failed: tracking server unreachable" in res.stderr  # the final line
    assert "a logger failed" in res.stderr
    assert "logger mlflow failed: tracking server unreachable" in (run / "report.html").read_text()
    card = (run / "final" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n") and "pipeline_tag: text-classification" in card
    assert str(toy_classification["dir"]) not in card  # the base by name, not this machine's path
    assert f"**{Path(raw['model']['name']).name}**" in card and "| accuracy |" in card
    assert "- training rows: 64" in card and "- evaluation rows: 16" in card and "- torch " in card


@pytest.mark.e2e
def test_loggers_required_makes_a_failing_logger_an_input_error(toy_classification, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", FailingMlflow().module())
    raw = copy.deepcopy(toy_classification["config"])
    raw["monitor"] = {"loggers": ["mlflow"], "loggers_required": True}
    run = tmp_path / "run"
    res = runner.invoke(app, ["train", str(write_config(tmp_path, raw)), "-o", str(run)])
    assert res.exit_code == 2, res.output
    line = res.stderr.strip().splitlines()[-1]
    assert "monitor.loggers" in line and "tracking server unreachable" in line and "loggers_required" in line
    assert not run.exists()


@pytest.mark.unit
def test_model_card_for_an_adapter_names_the_base_by_hub_id(tmp_path):
    from tunelab.model_card import model_card

    cfg = Config.model_validate({"task": "chat", "model": {"name": "smollm2-135m-instruct"},
                                 "data": {"train": str(tmp_path / "t.jsonl")}, "method": "lora"})
    summary = {"status": "completed", "steps": 10, "data": {"train": {"examples": 30}, "eval": {"examples": 5}},
               "before": {"eval_loss": 2.5, "eval_perplexity": 12.2}, "final": {"loss": 1.5, "perplexity": 4.5},
               "trainable_params": 1000, "total_params": 135_000_000, "trainable_percent": 0.0007}
    card = model_card(summary, cfg, adapter=True, command="tunelab train chat.yaml -o runs/x", run_name="x")
    assert "library_name: peft" in card and "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
    assert "pipeline_tag: text-generation" in card and "| perplexity | 12.2000 | 4.5000 |" in card
    assert "tunelab train chat.yaml -o runs/x" in card and "PeftModel.from_pretrained" in card
    assert "- training rows: 30" in card and "- evaluation rows: 5" in card


@pytest.mark.parametrize("args", [
    ["train", "{tmp}/missing.yaml"], ["plan", "{tmp}/missing.yaml"], ["eval", "{tmp}/missing", "--data", "{tmp}/d.csv"],
    ["generate", "{tmp}/missing", "--prompt", "hi"], ["merge", "{tmp}/missing", "-o", "{tmp}/m"],
    ["drift", "{tmp}/missing"], ["report", "{tmp}/missing"], ["compare", "{tmp}/missing"],
    ["export", "{tmp}/missing"], ["data", "check", "{tmp}/missing.jsonl"], ["init", "nonsense"],
    ["config", "--key", "zzz"],
], ids=lambda a: " ".join(a[:2]))
@pytest.mark.e2e
def test_every_verb_says_an_input_error_as_json_under_json(tmp_path, args):
    res = runner.invoke(app, [a.format(tmp=tmp_path) for a in args] + ["--json"])
    assert res.exit_code == 2, res.output
    error = json.loads(res.stdout)["error"]
    assert error["kind"] == "input" and error["exit_code"] == 2 and error["message"]
    assert len(res.stderr.strip().splitlines()) == 1 and res.stderr.startswith("error: ")


@pytest.mark.parametrize("args", [["eval", "x", "--bogus", "--json"], ["plan", "--json", "--nproc", "0", "c.yaml"],
                                  ["data", "check", "--json"]], ids=lambda a: " ".join(a[:3]))
@pytest.mark.e2e
def test_a_usage_error_under_json_is_json_too(args):
    """An unknown flag, a bad value or a missing argument never reaches the verb: the group says it,
    as one stderr line and, under --json, one JSON object on stdout (kind usage)."""
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    error = json.loads(res.stdout)["error"]
    assert error["kind"] == "usage" and error["exit_code"] == 2 and error["message"]
    assert len(res.stderr.strip().splitlines()) == 1 and res.stderr.startswith("error: ")
    plain = runner.invoke(app, [a for a in args if a != "--json"])
    assert plain.exit_code == 2 and plain.stdout == ""
