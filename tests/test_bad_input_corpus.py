"""A second malformed-input corpus (issue 13): strict numbers, conflicting options, YAML shape,
data-file classes (non-regular files, NUL bytes, trailing commas, lone surrogates, missing-value
labels, overlong lines, tool calls, chat structure), model folders checked at load, run-dir and
usage errors. Same contract as tests/test_bad_input.py: exit 2, ONE line naming the place, no
traceback, nothing left behind.

Every case runs in-process through the CLI (typer's CliRunner) and nearly all fail before a model
loads, so the corpus stays fast; the case tables are built programmatically where a rule applies
to every key of a kind (each numeric key x each YAML spelling of a boolean).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import typer.main
import typer.testing
from typer.testing import CliRunner

from test_bad_input import (BASE, FOLDER, MISSING_MODEL, OBJS, Case, Workspace, _snapshot, csv_with, data_case,
                            json_array, jsonl_with, location_pattern, parquet)
from tunelab.cli import app
from tunelab.config import Config, _numeric

runner = CliRunner()
_COMMAND = typer.main.get_command(app)  # built once: typer rebuilds it on every invoke (~70% of a case's time)


@pytest.fixture(autouse=True)
def _command_built_once(monkeypatch):
    monkeypatch.setattr(typer.testing, "_get_command", lambda _app: _COMMAND)


def cfg_case(id: str, text: str, loc: str, *says: str, args: tuple = (), files: dict | None = None) -> Case:
    """A config (with a good train.csv beside it, and `files`) run through `tunelab train`."""

    def build(ws: Workspace) -> list[str]:
        ws.write("train.csv", csv_with())
        for name, content in (files or {}).items():
            ws.write(name, content)
        return ws.train_args(ws.write("cfg.yaml", text), *args)

    return Case(id, build, loc, says)


# ---------------------------------------------------------------- strict numbers (generated)

SECTION_LINE = {"model": 3, "data": 5}  # sections BASE already opens: a key goes on line 6 (data) / 4 (model)


def numeric_keys() -> list[tuple[str, str, object]]:
    """(section, key, field) for every numeric key of the config."""
    out = []
    for section, f in Config.model_fields.items():
        model = f.annotation
        if not (isinstance(model, type) and hasattr(model, "model_fields")):
            continue
        for key, kf in model.model_fields.items():
            if _numeric(kf.annotation):
                out.append((section, key, kf))
    return out


def with_key(section: str, key: str, value: str) -> tuple[str, int]:
    """BASE plus `section.key: value`; returns the text and the key's line."""
    if section == "data":
        return BASE + f"  {key}: {value}\n", 6
    if section == "model":
        return BASE.replace(f"  name: {MISSING_MODEL}\n", f"  name: {MISSING_MODEL}\n  {key}: {value}\n"), 4
    return BASE + f"{section}:\n  {key}: {value}\n", 7


def bool_cases() -> list[Case]:
    cases = []
    for section, key, _ in numeric_keys():
        for spelling in ("true", "on", "yes", "Off"):
            value = f"[{spelling}, 0.9]" if key == "betas" else spelling
            text, line = with_key(section, key, value)
            cases.append(cfg_case(f"bool-{spelling}-{section}.{key}", text, f"cfg.yaml:{line} field '{section}.{key}'",
                                  "boolean"))
        cases.append(cfg_case(f"bool-set-{section}.{key}", BASE, f"cfg.yaml --set field '{section}.{key}'", "boolean",
                              args=("--set", f"{section}.{key}={'[no, 0.9]' if key == 'betas' else 'no'}")))
    return cases


def bound(field, kind: str):
    for m in field.metadata:
        for attr in (("gt", "ge") if kind == "low" else ("lt", "le")):
            if getattr(m, attr, None) is not None:
                return attr, getattr(m, attr)
    return None


def range_cases() -> list[Case]:
    cases = []
    for section, key, f in numeric_keys():
        if key == "betas":
            continue
        low, high = bound(f, "low"), bound(f, "high")
        if low:
            text, line = with_key(section, key, str(low[1] - 1))
            cases.append(cfg_case(f"below-{section}.{key}", text, f"cfg.yaml:{line} field '{section}.{key}'",
                                  "greater than"))
        if high:
            text, line = with_key(section, key, str(int(high[1]) * 10 + 10))
            cases.append(cfg_case(f"above-{section}.{key}", text, f"cfg.yaml:{line} field '{section}.{key}'", "less than"))
        text, line = with_key(section, key, "fast")
        cases.append(cfg_case(f"word-{section}.{key}", text, f"cfg.yaml:{line} field '{section}.{key}'", "'fast'"))
    return cases


# ---------------------------------------------------------------- conflicting options

CONFLICTS = [
    ("full_with_lora", "method: full\nlora:\n  r: 4\n", 7, "lora", "method: lora"),
    ("freeze_with_lora_section", "method: freeze\nfreeze:\n  blocks: 1\nlora:\n  r: 4\n", 9, "lora", "ignores it"),
    ("lora_with_freeze_blocks", "method: lora\nfreeze:\n  blocks: 1\n", 7, "freeze", "method: freeze"),
    ("qlora_with_all_but_head", "method: qlora\nfreeze:\n  all_but_head: true\n", 7, "freeze", "ignores it"),
    ("full_with_feature_extraction", "feature_extraction:\n  cache_features: false\n", 6, "feature_extraction", "ignores it"),
    ("lora_with_feature_extraction", "method: lora\nfeature_extraction:\n  cache_features: false\n", 7,
     "feature_extraction", "ignores it"),
    ("unfreeze_with_lora", "method: lora\nunfreeze:\n  every: 1\n", 8, "unfreeze.every", "gradual unfreezing"),
    ("head_lr_and_multiplier", "optim:\n  head_lr: 1.0e-3\n  head_lr_multiplier: 5\n", 7, "optim.head_lr", "not both"),
    ("replay_ratio_without_data", "regularization:\n  replay_ratio: 0.2\n", 7, "regularization.replay_ratio",
     "replay_data"),
    ("replay_data_without_ratio", "regularization:\n  replay_data: train.csv\n", 7, "regularization.replay_data",
     "replay_ratio"),
    ("ewc_data_without_ewc", "regularization:\n  ewc_data: train.csv\n", 7, "regularization.ewc_data", "ewc"),
    ("eval_loss_max", "checkpoint:\n  metric: eval_loss\n  mode: max\n", 8, "checkpoint.mode", "mode: min"),
    ("eval_accuracy_min", "checkpoint:\n  metric: eval_accuracy\n  mode: min\n", 8, "checkpoint.mode", "mode: max"),
    ("eval_macro_f1_min", "checkpoint:\n  metric: eval_macro_f1\n  mode: min\n", 8, "checkpoint.mode", "mode: max"),
    ("perplexity_max", "checkpoint:\n  metric: eval_perplexity\n  mode: max\n", 8, "checkpoint.mode", "mode: min"),
    ("warmup_both", "schedule:\n  warmup_steps: 5\n  warmup_ratio: 0.1\n", 6, "schedule", "not both"),
]
DATA_CONFLICTS = [  # keys added to the data section (line 6 on)
    ("classification_overflow", "  overflow: drop\n", 6, "data.overflow", "chat and causal_lm only"),
    ("classification_packing", "  packing: true\n", 6, "data.packing", "chat and causal_lm only"),
    ("text_is_label", "  text_column: label\n", 6, "data.text_column", "different column"),
    ("text_is_pair", "  text_pair_column: text\n", 6, "data.text_pair_column", "different column"),
    ("label_is_pair", "  text_pair_column: label\n", 6, "data.text_pair_column", "different column"),
    ("all_three_same", "  text_column: x\n  label_column: x\n", 7, "data.label_column", "different column"),
    ("lm_format_for_classification", "  format: openai\n", 6, "data.format", "chat/causal_lm format"),
]
LM_CONFLICTS = [  # task chat/causal_lm with a classification-only key
    ("chat_labels", "chat", "  labels: [a, b]\n", "data.labels"),
    ("chat_label_column", "chat", "  label_column: y\n", "data.label_column"),
    ("chat_pair_column", "chat", "  text_pair_column: q\n", "data.text_pair_column"),
    ("causal_lm_labels", "causal_lm", "  labels: [a, b]\n", "data.labels"),
    ("causal_lm_label_column", "causal_lm", "  label_column: y\n", "data.label_column"),
    ("chat_file_format", "chat", "  format: csv\n", "data.format"),
    ("causal_lm_file_format", "causal_lm", "  format: parquet\n", "data.format"),
]


def conflict_cases() -> list[Case]:
    cases = [cfg_case(f"conflict-{i}", BASE + extra, f"cfg.yaml:{line} field '{field}'", says)
             for i, extra, line, field, says in CONFLICTS]
    cases += [cfg_case(f"conflict-{i}", BASE + extra, f"cfg.yaml:{line} field '{field}'", says)
              for i, extra, line, field, says in DATA_CONFLICTS]
    for i, task, extra, field in LM_CONFLICTS:
        text = BASE.replace("task: classification", f"task: {task}") + extra
        cases.append(cfg_case(f"conflict-{i}", text, f"cfg.yaml:6 field '{field}'",
                              "file type" if field == "data.format" else "classification only"))
    for task in ("chat", "causal_lm"):
        text = BASE.replace("task: classification", f"task: {task}") + "method: feature_extraction\n"
        cases.append(cfg_case(f"conflict-{task}_feature_extraction", text, "cfg.yaml:6 field 'method'",
                              "classification head"))
    cases.append(cfg_case("conflict-no_eval_but_early_stopping", BASE + "  eval_split: 0\n",
                          "cfg.yaml field 'early_stopping.enabled'", "needs evaluation"))
    return cases


# ---------------------------------------------------------------- YAML shape and other config values

def _deep(n: int) -> str:
    return BASE + "x: " + "[" * n + "]" * n + "\n"


def _laughs() -> str:
    lines = ["a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for i, name in enumerate("bcdef"):
        prev = "abcdef"[i]
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 10) + "]")
    return BASE + "\n".join(lines) + "\n"


YAML_CASES = [
    cfg_case("yaml-recursive_alias_list", BASE + "x: &a [*a]\n", "cfg.yaml:6", "recursive"),
    cfg_case("yaml-recursive_alias_map", BASE + "x: &a\n  y: *a\n", "cfg.yaml:6", "recursive"),
    cfg_case("yaml-deep_flow_nesting", _deep(40), "cfg.yaml:6", "deeper than 32"),
    cfg_case("yaml-very_deep_nesting", _deep(5000), "cfg.yaml", "deeper than 32"),
    cfg_case("yaml-deep_block_nesting", BASE + "".join("  " * i + f"k{i}:\n" for i in range(40)) + "  " * 40 + "v: 1\n",
             "cfg.yaml:38", "deeper than 32"),
    cfg_case("yaml-billion_laughs", _laughs(), "cfg.yaml:6", "more than 100000"),
    cfg_case("yaml-python_tag", BASE + "x: !!python/object/apply:os.system ['true']\n", "cfg.yaml:6", "invalid YAML"),
    cfg_case("yaml-unknown_tag", BASE + "optim:\n  lr: !secret 1\n", "cfg.yaml:7", "invalid YAML"),
    cfg_case("yaml-nul_byte", BASE + "optim:\n  lr: 1\x00\n", "cfg.yaml:7", "NUL"),
    cfg_case("yaml-unhashable_key", BASE + "? [a, b]\n: 1\n", "cfg.yaml:6", "invalid YAML"),
    cfg_case("yaml-alias_to_section", BASE + "optim: &o\n  lr: 0.1\ntrain: *o\n", "cfg.yaml:7 field 'train.lr'", "unknown key"),
    cfg_case("yaml-merge_unknown", BASE + "base: &b {lr: 1}\noptim:\n  <<: *b\n  lrr: 2\n", "cfg.yaml:9 field 'optim.lrr'", "unknown key"),
    cfg_case("yaml-section_a_list", BASE + "optim: [1, 2]\n", "cfg.yaml:6 field 'optim'"),
    cfg_case("yaml-section_a_number", BASE + "train: 5\n", "cfg.yaml:6 field 'train'"),
    cfg_case("yaml-numeric_key", BASE + "1: x\n", "cfg.yaml:6 field '1'", "strings"),
    cfg_case("yaml-seed_128_bits", BASE + "train:\n  seed: 340282366920938463463374607431768211456\n",
             "cfg.yaml:7 field 'train.seed'", "less than or equal"),
    cfg_case("yaml-seed_negative", BASE + "train:\n  seed: -1\n", "cfg.yaml:7 field 'train.seed'", "greater than"),
    cfg_case("yaml-target_modules_empty", BASE + "method: lora\nlora:\n  target_modules: []\n",
             "cfg.yaml:8 field 'lora.target_modules'", "at least one"),
    cfg_case("yaml-target_modules_blank", BASE + "method: lora\nlora:\n  target_modules: ['']\n",
             "cfg.yaml:8 field 'lora.target_modules'", "at least one"),
    cfg_case("yaml-target_modules_numbers", BASE + "method: lora\nlora:\n  target_modules: [1]\n",
             "cfg.yaml:8 field 'lora.target_modules.0'", "string"),
    cfg_case("yaml-target_modules_word", BASE + "method: lora\nlora:\n  target_modules: everything\n",
             "cfg.yaml:8 field 'lora.target_modules'"),
    cfg_case("yaml-loggers_unknown", BASE + "monitor:\n  loggers: [neptune]\n", "cfg.yaml:7 field 'monitor.loggers.0'"),
    cfg_case("yaml-labels_a_string", BASE + "  labels: pos\n", "cfg.yaml:6 field 'data.labels'"),
    cfg_case("yaml-labels_numbers", BASE + "  labels: [1, 2]\n", "cfg.yaml:6 field 'data.labels.0'", "string"),
    cfg_case("yaml-allow_pickle_word", BASE.replace("model:\n", "model:\n  allow_pickle: sure\n"),
             "cfg.yaml:3 field 'model.allow_pickle'", "'sure'"),
    cfg_case("yaml-versions_a_list", BASE + "versions: [1]\n", "cfg.yaml:6 field 'versions'"),
    cfg_case("yaml-eval_split_099_small", BASE + "  eval_split: 0.99\n", "cfg.yaml:6 field 'data.eval_split'",
             "no training rows"),
    cfg_case("yaml-set_bool_into_lr", BASE, "cfg.yaml --set field 'optim.lr'", "boolean", args=("--set", "optim.lr=on")),
    cfg_case("yaml-set_recursive_list", BASE, "cfg.yaml --set field 'optim.betas.0'", args=("--set", "optim.betas=[[[]]]")),
]


def config_path_cases() -> list[Case]:
    def fifo(ws: Workspace) -> Path:
        os.mkfifo(ws.root / "cfg.yaml")
        return ws.root / "cfg.yaml"

    def loop(ws: Workspace) -> Path:
        os.symlink(ws.root / "cfg.yaml", ws.root / "cfg.yaml")
        return ws.root / "cfg.yaml"

    def dangling(ws: Workspace) -> Path:
        os.symlink(ws.root / "gone.yaml", ws.root / "cfg.yaml")
        return ws.root / "cfg.yaml"

    def device(ws: Workspace) -> Path:
        os.symlink("/dev/zero", ws.root / "cfg.yaml")
        return ws.root / "cfg.yaml"

    return [Case(f"cfgpath-{name}", lambda ws, m=make: ws.train_args(m(ws)), "cfg.yaml", (says,))
            for name, make, says in (("fifo", fifo, "FIFO"), ("symlink_loop", loop, "symbolic link loop"),
                                     ("dangling_symlink", dangling, "not found"), ("device", device, "device"))]


# ---------------------------------------------------------------- data files

def fifo(path: Path) -> None:
    os.mkfifo(path)


def symlink_loop(path: Path) -> None:
    os.symlink(path, path)


def to_dev_null(path: Path) -> None:
    os.symlink("/dev/null", path)


PAD = "x" * 9000  # pushes a NUL past the first 8 KiB
MISSING_SPELLINGS = ["None", "none", "null", "NULL", "nil", "NA", "N/A", "n/a", "#N/A", "<NA>", "missing", "undefined",
                     "?", "-"]
CHAT_OK = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def chat_line(messages) -> str:
    return json.dumps({"messages": messages})


def chat_file(bad_line: str, at: int = 2) -> str:
    lines = [json.dumps(CHAT_OK)] * 3
    lines[at - 1] = bad_line
    return "\n".join(lines) + "\n"


DATA = [
    # non-regular files and links
    *[c for suffix in ("csv", "jsonl", "json", "tsv", "parquet")
      for c in data_case(f"fifo_{suffix}", {f"train.{suffix}": fifo}, f"train.{suffix}", "FIFO")],
    *[c for suffix in ("csv", "jsonl") for c in data_case(f"symlink_loop_{suffix}", {f"train.{suffix}": symlink_loop},
                                                           f"train.{suffix}", "symbolic link loop")],
    *data_case("device_csv", {"train.csv": to_dev_null}, "train.csv", "device"),
    *data_case("fifo_txt_causal_lm", {"train.txt": fifo}, "train.txt", "FIFO", task="causal_lm", check=False),
    *data_case("eval_fifo", {"train.csv": csv_with(), "eval.csv": fifo}, "eval.csv", "FIFO", data="eval: eval.csv",
                check=False),
    # NUL bytes anywhere
    *data_case("nul_after_8k_csv", {"train.csv": csv_with({3: f"{PAD}\x00,neg"})}, "train.csv:3", "NUL"),
    *data_case("nul_after_8k_jsonl", {"train.jsonl": jsonl_with({5: json.dumps({"text": PAD, "label": "pos"}) + "\x00"})},
                "train.jsonl:5", "NUL"),
    *data_case("nul_at_end_tsv", {"train.tsv": "text\tlabel\n" + f"{PAD}\tpos\n" * 3 + "a\x00\tneg\n"}, "train.tsv:5", "NUL"),
    *data_case("nul_in_json", {"train.json": json_array(OBJS[:3]) + "\x00"}, "train.json:6", "NUL"),
    *data_case("nul_in_txt", {"train.txt": "a paragraph\n\n" + PAD + "\n\x00\n"}, "train.txt:4", "NUL", task="causal_lm",
                check=False),
    # JSON shapes
    *data_case("json_trailing_comma", {"train.json": json_array(OBJS).replace("}\n]", "},\n]")}, "train.json:9",
                "trailing comma"),
    *data_case("json_trailing_comma_one_line", {"train.json": json.dumps(OBJS)[:-1] + ",]"}, "train.json:1",
                "trailing comma"),
    *data_case("json_double_comma", {"train.json": json_array(OBJS).replace("},\n", "},,\n", 1)}, "train.json:2",
                "invalid JSON"),
    *data_case("jsonl_deep_nesting", {"train.jsonl": jsonl_with({2: '{"text": ' + "[" * 100000 + "]" * 100000 + "}"})},
                "train.jsonl:2", "invalid JSON"),
    *data_case("json_deep_nesting", {"train.json": "[" * 100000 + "]" * 100000}, "train.json:1", "invalid JSON"),
    *data_case("jsonl_huge_integer", {"train.jsonl": jsonl_with({3: '{"text": "a", "label": ' + "9" * 5000 + "}"})},
                "train.jsonl:3", "invalid JSON"),
    *data_case("jsonl_array_line", {"train.jsonl": jsonl_with({2: "[1, 2]"})}, "train.jsonl:2", "JSON object"),
    *data_case("jsonl_string_line", {"train.jsonl": jsonl_with({4: '"just text"'})}, "train.jsonl:4", "JSON object"),
    # lone surrogates
    *data_case("jsonl_lone_surrogate", {"train.jsonl": jsonl_with({3: '{"text": "bad \\ud800 char", "label": "pos"}'})},
                "train.jsonl:3", "lone surrogate"),
    *data_case("jsonl_low_surrogate", {"train.jsonl": jsonl_with({6: '{"text": "x\\udfff", "label": "neg"}'})},
                "train.jsonl:6", "lone surrogate"),
    *data_case("jsonl_surrogate_in_label", {"train.jsonl": jsonl_with({2: '{"text": "ok", "label": "\\udc80"}'})},
                "train.jsonl:2", "lone surrogate"),
    *data_case("json_lone_surrogate", {"train.json": json_array(OBJS[:2] + [{"text": "\ud800", "label": "pos"}] + OBJS[2:])},
                "train.json:4", "lone surrogate"),
    *data_case("json_data_key_surrogate", {"train.json": json.dumps({"data": OBJS[:2] + [{"text": "\udfff", "label": "pos"}]})},
                "train.json record 2", "lone surrogate"),
    # overlong lines
    *data_case("csv_line_over_limit", {"train.csv": csv_with({4: "y" * 40_000_001 + ",pos"})}, "train.csv:4", "40,000,000"),
    *data_case("txt_line_over_limit", {"train.txt": "short\n\n" + "z" * 10_000_001 + "\n"}, "train.txt:3", "10,000,000",
                task="causal_lm", check=False),
    *data_case("txt_paragraph_over_limit", {"train.txt": "short\n\n" + ("w" * 1_000_000 + "\n") * 11}, "train.txt:3",
                "paragraph", task="causal_lm", check=False),
    *data_case("chat_content_over_limit",
                {"train.jsonl": chat_file(chat_line([{"role": "user", "content": "q" * 10_000_001},
                                                     {"role": "assistant", "content": "a"}]))},
                "train.jsonl:2 field 'messages[0].content'", "10,000,000", task="chat", check=False),
    # missing-value labels
    *[c for i, v in enumerate(MISSING_SPELLINGS)
      for c in data_case(f"csv_missing_label_{i}", {"train.csv": csv_with({4: f"fine film,{v}"})},
                          "train.csv:4 field 'label'", "missing value", check=False)],
    *[c for i, v in enumerate(MISSING_SPELLINGS[:6])
      for c in data_case(f"jsonl_missing_label_{i}", {"train.jsonl": jsonl_with({3: json.dumps({"text": "t", "label": v})})},
                          "train.jsonl:3 field 'label'", "missing value", check=False)],
    *data_case("eval_missing_label", {"train.csv": csv_with(), "eval.csv": csv_with({2: "x,NULL"})}, "eval.csv:2 field 'label'",
                "missing value", data="eval: eval.csv", check=False),
    *data_case("eval_split_leaves_a_class_empty", {"train.csv": csv_with()}, "cfg.yaml:5 field 'data.eval_split'",
                "no training rows", data="eval_split: 0.9", check=False),
    # chat structure
    *data_case("chat_tool_calls", {"train.jsonl": chat_file(chat_line([
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "1", "type": "function"}]},
        {"role": "assistant", "content": "sunny"}]))}, "train.jsonl:2 field 'messages[1].tool_calls'", "tool calls",
        task="chat", check=False),
    *data_case("chat_function_call", {"train.jsonl": chat_file(chat_line([
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "function_call": {"name": "f"}}]))},
        "train.jsonl:2 field 'messages[1].function_call'", "tool calls", task="chat", check=False),
    *data_case("chat_tool_role", {"train.jsonl": chat_file(chat_line([
        {"role": "user", "content": "q"}, {"role": "tool", "content": "42"}, {"role": "assistant", "content": "a"}]))},
        "train.jsonl:2 field 'messages[1].role'", "unknown role", task="chat", check=False),
    *data_case("chat_system_late", {"train.jsonl": chat_file(chat_line([
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "system", "content": "s"}]), 3)},
        "train.jsonl:3 field 'messages[2]'", "system", task="chat", check=False),
    *data_case("chat_assistant_first", {"train.jsonl": chat_file(chat_line([{"role": "assistant", "content": "a"}]))},
                "train.jsonl:2 field 'messages[0]'", "from the user", task="chat", check=False),
    *data_case("chat_content_list", {"train.jsonl": chat_file(chat_line([
        {"role": "user", "content": [{"type": "text", "text": "q"}]}, {"role": "assistant", "content": "a"}]))},
        "train.jsonl:2 field 'messages[0].content'", "string", task="chat", check=False),
    *data_case("chat_content_null", {"train.jsonl": chat_file(chat_line([
        {"role": "user", "content": "q"}, {"role": "assistant", "content": None}]))},
        "train.jsonl:2 field 'messages[1].content'", "string", task="chat", check=False),
    *data_case("chat_weight_two", {"train.jsonl": chat_file(chat_line([
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 2}]))},
        "train.jsonl:2 field 'messages[1].weight'", "0 or 1", task="chat", check=False),
    *data_case("chat_weight_true", {"train.jsonl": chat_file(chat_line([
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": True}]))},
        "train.jsonl:2 field 'messages[1].weight'", "0 or 1", task="chat", check=False),
    *data_case("chat_weight_on_user", {"train.jsonl": chat_file(chat_line([
        {"role": "user", "content": "q", "weight": 1}, {"role": "assistant", "content": "a"}]))},
        "train.jsonl:2 field 'messages[0].weight'", "assistant messages only", task="chat", check=False),
    *data_case("chat_messages_a_string", {"train.jsonl": chat_file('{"messages": "hi"}')},
                "train.jsonl:2 field 'messages'", "list of messages", task="chat", check=False),
    *data_case("chat_message_a_number", {"train.jsonl": chat_file('{"messages": [5]}')},
                "train.jsonl:2 field 'messages[0]'", "message object", task="chat", check=False),
    *data_case("chat_role_missing", {"train.jsonl": chat_file(chat_line([{"content": "q"}]))},
                "train.jsonl:2 field 'messages[0].role'", "missing", task="chat", check=False),
    *data_case("chat_role_a_number", {"train.jsonl": chat_file(chat_line([{"role": 1, "content": "q"}]))},
                "train.jsonl:2 field 'messages[0].role'", "unknown role", task="chat", check=False),
    *data_case("chat_lone_surrogate", {"train.jsonl": chat_file('{"messages": [{"role": "user", "content": "\\ud83d"}, '
                                                                 '{"role": "assistant", "content": "a"}]}')},
                "train.jsonl:2", "lone surrogate", task="chat", check=False),
    *data_case("sharegpt_unknown_from", {"train.jsonl": '{"conversations": [{"from": "bot", "value": "x"}]}\n'},
                "train.jsonl:1 field 'conversations[0].from'", "unknown role", task="chat", check=False),
    *data_case("alpaca_output_number", {"train.jsonl": '{"instruction": "do", "output": 5}\n'},
                "train.jsonl:1 field 'output'", "string", task="chat", check=False),
    *data_case("prompt_completion_list_mismatch", {"train.jsonl": '{"prompt": 5, "completion": "a"}\n'},
                "train.jsonl:1 field 'prompt'", "string", task="chat", check=False),
    *data_case("text_record_not_string", {"train.jsonl": '{"text": 42}\n'}, "train.jsonl:1 field 'text'", "string",
                task="causal_lm", check=False),
    *data_case("text_record_null", {"train.jsonl": '{"text": null}\n'}, "train.jsonl:1 field 'text'", "null",
                task="causal_lm", check=False),
    # CSV oddities
    *data_case("csv_header_duplicate_after_strip", {"train.csv": "text, text\na,b\n"}, "train.csv:1 field 'text'", "twice"),
    *data_case("csv_unclosed_quote_at_end", {"train.csv": csv_with({9: '"never closed,pos'})}, "train.csv:9", "never closed"),
    *data_case("tsv_too_few_fields", {"train.tsv": "text\tlabel\na\tpos\nb\n"}, "train.tsv:3", "1 fields"),
    *data_case("parquet_text_list", {"train.parquet": parquet({"text": [["a"], ["b"]], "label": ["pos", "neg"]})},
                "train.parquet record 0 field 'text'", "list"),
]


# ---------------------------------------------------------------- model folders

def model_cases() -> list[Case]:
    import torch
    from safetensors.torch import load_file, save_file

    def edit_weights(change):
        def make(ws: Workspace) -> Path:
            folder = ws.model()
            w = load_file(str(folder / "model.safetensors"))
            change(w)
            save_file(w, str(folder / "model.safetensors"), metadata={"format": "pt"})
            return folder
        return make

    def edit_config(change):
        def make(ws: Workspace) -> Path:
            folder = ws.model()
            cfg = json.loads((folder / "config.json").read_text())
            new = change(cfg)
            (folder / "config.json").write_text(json.dumps(cfg if new is None else new))
            return folder
        return make

    def nan_weight(w):
        w["bert.encoder.layer.0.attention.self.query.weight"][0, 0] = float("nan")

    def inf_weight(w):
        w["bert.embeddings.word_embeddings.weight"][3, 1] = float("inf")

    def wrong_shape(w):
        w["bert.encoder.layer.1.intermediate.dense.weight"] = torch.zeros(48, 32)

    def missing(w):
        del w["bert.encoder.layer.1.output.dense.weight"]

    def extra(w):
        w["bert.encoder.layer.7.output.dense.weight"] = torch.zeros(32, 64)

    def empty_safetensors(ws: Workspace) -> Path:
        folder = ws.model()
        save_file({}, str(folder / "model.safetensors"))
        return folder

    def pickle_only(ws: Workspace) -> Path:
        folder = ws.model()
        w = load_file(str(folder / "model.safetensors"))
        (folder / "model.safetensors").unlink()
        torch.save(w, folder / "pytorch_model.bin")
        return folder

    def small_vocab(cfg):
        cfg["vocab_size"] = 50

    def heads(cfg):
        cfg["num_attention_heads"] = 3

    def loop(ws: Workspace) -> Path:
        os.symlink(ws.root / "m", ws.root / "m")
        return ws.root / "m"

    def garbage_gguf(ws: Workspace) -> Path:
        return ws.write("model.gguf", b"GGUF" + os.urandom(64))

    table = [
        ("nan_weight", edit_weights(nan_weight), "model field 'model.name'", "NaN/Inf"),
        ("inf_weight", edit_weights(inf_weight), "model field 'model.name'", "NaN/Inf"),
        ("wrong_shape", edit_weights(wrong_shape), "model field 'model.name'", "intermediate.dense.weight has shape"),
        ("missing_tensor", edit_weights(missing), "model field 'model.name'", "lack bert.encoder.layer.1.output.dense.weight"),
        ("extra_tensor", edit_weights(extra), "model field 'model.name'", "layer.7"),
        ("empty_safetensors", empty_safetensors, "model.safetensors field 'model.name'", "no tensors"),
        ("pickle_refused", pickle_only, "model field 'model.name'", "model.allow_pickle"),
        ("config_json_a_list", edit_config(lambda c: [c]), "config.json field 'model.name'", "JSON object"),
        ("config_json_heads", edit_config(heads), "config.json field 'model.name'", "does not divide"),
        ("config_json_negative_layers", edit_config(lambda c: c.update(num_hidden_layers=-1)),
         "config.json field 'model.name'", "positive integer"),
        ("config_json_bool_hidden", edit_config(lambda c: c.update(hidden_size=True)), "config.json field 'model.name'",
         "positive integer"),
        ("vocab_smaller_than_tokenizer", edit_weights_and_config(small_vocab), "model field 'model.name'",
         "embedding only 50 rows"),
        ("tokenizer_json_corrupt", lambda ws: ws.model(files={"tokenizer.json": '{"model": '}),
         "tokenizer.json field 'model.name'", "not valid JSON"),
        ("tokenizer_json_a_list", lambda ws: ws.model(files={"tokenizer.json": "[1, 2]"}),
         "tokenizer.json field 'model.name'", "not a tokenizers file"),
        ("symlink_loop", loop, "m field 'model.name'", "symbolic link loop"),
        ("garbage_gguf", garbage_gguf, "model.gguf field 'model.name'", ""),
    ]
    cases = []
    for id, make, loc, says in table:
        def build(ws: Workspace, make=make) -> list[str]:
            ws.write("train.csv", csv_with())
            name = make(ws)
            return ws.train_args(ws.write("cfg.yaml", f"model:\n  name: {name}\n  max_length: 32\ndata:\n"
                                                      "  train: train.csv\ntrain:\n  max_steps: 1\n"))
        cases.append(Case(f"model-{id}", build, loc, (says,) if says else ()))
    return cases


def edit_weights_and_config(change):
    """Shrink the vocabulary consistently (config and embedding), so only the tokenizer disagrees."""
    def make(ws: Workspace) -> Path:
        from safetensors.torch import load_file, save_file

        folder = ws.model()
        cfg = json.loads((folder / "config.json").read_text())
        change(cfg)
        (folder / "config.json").write_text(json.dumps(cfg))
        w = load_file(str(folder / "model.safetensors"))
        key = "bert.embeddings.word_embeddings.weight"
        w[key] = w[key][: cfg["vocab_size"]].clone()
        save_file(w, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder
    return make


# ---------------------------------------------------------------- run dir and usage

def rundir_cases() -> list[Case]:
    def case(id: str, prepare, loc: str, says: str, args=(), preexists=True) -> Case:
        def build(ws: Workspace) -> list[str]:
            ws.write("train.csv", csv_with())
            prepare(ws)
            return ws.train_args(ws.write("cfg.yaml", BASE), *[str(ws.root / a[3:]) if a.startswith("WS/") else a
                                                              for a in args])
        return Case(f"rundir-{id}", build, loc, (says,), out_preexists=preexists)

    return [
        case("symlink_loop", lambda ws: os.symlink(ws.out, ws.out), "run", "symbolic link loop"),
        case("dangling_symlink", lambda ws: os.symlink(ws.root / "gone" / "deeper", ws.out), "run", "dangling"),
        case("output_dir_is_a_file", lambda ws: ws.write("run", "x"), "run", "is a file"),
        case("damaged_summary", lambda ws: (ws.write("run/checkpoints/x", ""), ws.write("run/summary.json", "{")),
             "summary.json", "damaged", args=("--resume", "auto")),
        case("summary_a_list", lambda ws: (ws.write("run/checkpoints/x", ""), ws.write("run/summary.json", "[1]")),
             "summary.json", "damaged", args=("--resume", "auto")),
        case("holds_checkpoints_no_resume", lambda ws: ws.write("run/checkpoints/step-000002/x", ""), "run", "--resume auto"),
        case("resume_from_a_file", lambda ws: ws.write("ck", "x"), "ck", "not a folder", args=("--resume", "WS/ck"),
             preexists=False),
        case("resume_from_empty_folder", lambda ws: ws.write("ck", FOLDER), "ck", "manifest", args=("--resume", "WS/ck"),
             preexists=False),
        case("resume_from_bad_manifest", lambda ws: ws.write("ck/manifest.json", "{"), "ck", "unreadable manifest",
             args=("--resume", "WS/ck"), preexists=False),
    ]


def usage_case(id: str, args: list[str], says: str) -> Case:
    def build(ws: Workspace) -> list[str]:
        ws.write("train.csv", csv_with())
        cfg = ws.write("cfg.yaml", BASE)
        return [str(cfg) if a == "CFG" else a for a in args]
    return Case(f"usage-{id}", build, "", (says,))


USAGE = [
    usage_case("nproc_zero", ["train", "CFG", "--nproc", "0"], "--nproc"),
    usage_case("nproc_word", ["train", "CFG", "--nproc", "two"], "--nproc"),
    usage_case("unknown_flag", ["train", "CFG", "--bogus"], "No such option: --bogus"),
    usage_case("missing_config", ["train"], "Missing argument"),
    usage_case("unknown_verb", ["trian", "CFG"], "No such command"),
    usage_case("eval_without_data", ["eval", "CFG"], "Missing option '--data'"),
    usage_case("data_check_missing_file", ["data", "check"], "Missing argument"),
    usage_case("plan_negative_steps", ["plan", "CFG", "--measure-steps", "-1"], "--measure-steps"),
    usage_case("generate_without_prompt", ["generate", "CFG"], "Missing option '--prompt'"),
    usage_case("set_without_value", ["train", "CFG", "--set"], "requires an argument"),
]


CASES = (bool_cases() + range_cases() + conflict_cases() + YAML_CASES + config_path_cases() + DATA + model_cases()
         + rundir_cases() + USAGE)
CLASSES = ("bool", "below", "above", "word", "conflict", "yaml", "cfgpath", "train", "check", "model", "rundir", "usage")


@pytest.mark.unit
def test_corpus_size_and_ids():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(CASES) >= 400, len(CASES)
    counts = {k: sum(i.startswith(k + "-") for i in ids) for k in CLASSES}
    assert sum(counts.values()) == len(ids), counts


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.e2e
def test_malformed_input_is_one_located_line_exit_2(case: Case, tmp_path: Path, request: pytest.FixtureRequest):
    ws = Workspace(tmp_path, request)
    args = case.build(ws)
    before = _snapshot(ws.out) if case.out_preexists and ws.out.exists() and not ws.out.is_symlink() else None
    result = runner.invoke(app, args)
    shown = f"exit {result.exit_code}\nstderr:\n{result.stderr}\nstdout:\n{result.stdout[-1500:]}"
    assert result.exit_code == 2, shown
    assert "Traceback" not in result.output, shown
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and result.stdout == "", shown
    if case.loc:
        assert re.match(location_pattern(case.loc), lines[0]), f"expected location {case.loc!r} in:\n{lines[0]}"
    else:
        assert lines[0].startswith("error: "), lines[0]
    for word in case.says:
        assert word in lines[0], f"expected {word!r} in:\n{lines[0]}"
    if before is not None:
        assert _snapshot(ws.out) == before, "a bad input changed the existing output dir"
    elif not case.out_preexists:
        assert not os.path.lexists(ws.out), "a bad input left a run dir behind"
