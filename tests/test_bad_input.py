"""The bad-input guarantee, case by case: malformed configs, data files and models.

Contract (DESIGN.md, "Contracts"): every malformed input ends with exit code 2 and ONE line on
stderr, `error: FILE[:LINE] [record N] field 'X': message`, naming file, line and field wherever
they exist; no Python traceback; and no run dir left behind (bad input is detected before the run
dir is created). Each case builds its input in tmp_path and runs the real CLI in-process.

The library prints the GNU style `FILE:LINE: field 'X': message` (editors jump to it); the tests
accept that ':' and the space form alike, and pin the file, line, record and field exactly.

To grow the corpus, append to a table below. A case gives the exact location as printed after the
folder part of the path (`loc`, e.g. "train.csv:4 field 'label'") and words the message must hold.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import typer.main
import typer.testing
from typer.testing import CliRunner

from tunelab.cli import app

runner = CliRunner()
_COMMAND = typer.main.get_command(app)  # built once: typer rebuilds it on every invoke (~70% of a case's time)


@pytest.fixture(autouse=True)
def _command_built_once(monkeypatch):
    monkeypatch.setattr(typer.testing, "_get_command", lambda _app: _COMMAND)

ROWS = [
    ("the movie was great fun", "pos"),
    ("boring and awful", "neg"),
    ("i loved the acting", "pos"),
    ("terrible plot", "neg"),
    ("lovely music", "pos"),
    ("bad ending", "neg"),
    ("really good film", "pos"),
    ("i hated it", "neg"),
]
OBJS = [{"text": t, "label": y} for t, y in ROWS]
MISSING_MODEL = "./missing-model"  # data/config cases never reach the model; if one does, it fails loudly
FOLDER = object()  # file content meaning "make a folder of this name"


# ---------------------------------------------------------------- building inputs


def csv_lines(rows=ROWS, header="text,label", sep=",") -> list[str]:
    return [header] + [f"{t}{sep}{y}" for t, y in rows]


def lines_with(lines: list[str], changes: dict[int, str | None]) -> str:
    """Join lines after replacing line N (1-based) with a new text, or dropping it (None)."""
    out = list(lines)
    for n in sorted(changes, reverse=True):
        if changes[n] is None:
            del out[n - 1]
        else:
            out[n - 1] = changes[n]
    return "\n".join(out) + "\n"


def csv_with(changes: dict[int, str | None] | None = None, **kw) -> str:
    """The good CSV (header on line 1) with some lines replaced."""
    return lines_with(csv_lines(**kw), changes or {})


def tsv_with(changes: dict[int, str | None] | None = None) -> str:
    return lines_with(csv_lines(header="text\tlabel", sep="\t"), changes or {})


def jsonl_with(changes: dict[int, str | None] | None = None, objs=OBJS) -> str:
    """The good JSONL (first record on line 1) with some lines replaced by raw text."""
    return lines_with([json.dumps(o) for o in objs], changes or {})


def json_array(items: list) -> str:
    """A JSON array with one item per line: item i sits on line i + 2."""
    return "[\n" + ",\n".join(json.dumps(o) for o in items) + "\n]\n"


def parquet(columns: dict[str, list], types: dict | None = None) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([(k, (types or {}).get(k) or pa.infer_type(v)) for k, v in columns.items()]) if types else None
        pq.write_table(pa.table(columns, schema=schema), path)

    return write


def truncated_parquet(path: Path) -> None:
    parquet({"text": [t for t, _ in ROWS], "label": [y for _, y in ROWS]})(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


class Workspace:
    """The tmp folder of one case: writes files, builds model folders, knows the run dir."""

    def __init__(self, root: Path, request: pytest.FixtureRequest):
        self.root = root
        self.out = root / "run"
        self._request = request

    def write(self, name: str, content) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is None:  # a file that is named but must not exist
            pass
        elif content is FOLDER:
            path.mkdir()
        elif callable(content):
            content(path)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        return path

    def model(self, name: str = "model", drop: tuple[str, ...] = (), files: dict | None = None) -> Path:
        """A copy of the shared tiny BERT, minus `drop` (glob patterns), plus `files`."""
        folder = self.root / name
        shutil.copytree(self._request.getfixturevalue("tiny_bert"), folder)
        for pattern in drop:
            for p in folder.glob(pattern):
                p.unlink()
        for rel, content in (files or {}).items():
            self.write(f"{name}/{rel}", content)
        return folder

    def train_args(self, config: Path | str, *extra: str) -> list[str]:
        return ["train", str(config), "--output-dir", str(self.out), "--no-progress", *extra]


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[Workspace], list[str]]  # writes the inputs, returns the CLI arguments
    loc: str  # the location as printed after the folder: "train.csv:4 field 'label'"
    says: tuple[str, ...] = ()  # words the message must contain
    out_preexists: bool = False  # the case makes --output-dir itself; it must stay as it was


# ---------------------------------------------------------------- configs

# Lines 1-5 of every config case; what a case appends starts on line 6.
BASE = f"""task: classification
model:
  name: {MISSING_MODEL}
data:
  train: train.csv
"""


def config_case(id: str, text: str | bytes, loc: str, *says: str, args: tuple[str, ...] = ()) -> Case:
    def build(ws: Workspace) -> list[str]:
        ws.write("train.csv", csv_with())
        return ws.train_args(ws.write("cfg.yaml", text), *args)

    return Case(f"config-{id}", build, loc, says)


def path_case(id: str, make: Callable[[Workspace], Path], loc: str, *says: str) -> Case:
    def build(ws: Workspace) -> list[str]:
        return ws.train_args(make(ws))

    return Case(f"config-{id}", build, loc, says)


CONFIG_CASES = [
    path_case("missing_file", lambda ws: ws.root / "nope.yaml", "nope.yaml", "not found"),
    path_case("a_folder", lambda ws: ws.write("confdir/x", "") and ws.root / "confdir", "confdir", "folder"),
    config_case("empty_file", "", "cfg.yaml", "empty"),
    config_case("only_comments", "# nothing here\n\n", "cfg.yaml", "empty"),
    config_case("tab_indent", BASE + "optim:\n\tlr: 1\n", "cfg.yaml:7", "invalid YAML"),
    config_case("mapping_in_value", BASE + "optim:\n  lr: a: b\n", "cfg.yaml:7", "invalid YAML"),
    config_case("unclosed_flow_list", BASE + "optim:\n  betas: [0.9, 0.99\ntrain:\n  epochs: 1\n", "cfg.yaml:8", "invalid YAML"),
    config_case("two_documents", BASE + "---\ntask: classification\n", "cfg.yaml:6", "invalid YAML"),
    config_case("top_level_list", "- task: classification\n- data: x\n", "cfg.yaml:1", "mapping"),
    config_case("top_level_scalar", "classification\n", "cfg.yaml:1", "mapping"),
    config_case("not_utf8", BASE.encode() + b"optim:\n  lr: 1e-3 # caf\xe9\n", "cfg.yaml:7", "UTF-8"),
    config_case("duplicate_section", BASE + "optim:\n  lr: 1.0e-3\noptim:\n  lr: 2.0e-3\n", "cfg.yaml:8 field 'optim'", "twice"),
    config_case("duplicate_nested_key", BASE + "  train: other.csv\n", "cfg.yaml:6 field 'data.train'", "twice"),
    config_case("unknown_top_level_key", BASE + "\noptimiser:\n  lr: 1\n", "cfg.yaml:7 field 'optimiser'", "unknown key"),
    config_case("unknown_nested_key", BASE + "optim:\n  lr: 1.0e-3\n  lrr: 1\n", "cfg.yaml:8 field 'optim.lrr'", "unknown key"),
    config_case("unknown_data_key", BASE + "  text_col: sentence\n", "cfg.yaml:6 field 'data.text_col'", "unknown key"),
    config_case("lr_not_a_number", BASE + "optim:\n  lr: fast\n", "cfg.yaml:7 field 'optim.lr'", "'fast'"),
    config_case("lr_negative", BASE + "optim:\n  lr: -1.0e-3\n", "cfg.yaml:7 field 'optim.lr'", "must be > 0"),
    config_case("lr_nan", BASE + "optim:\n  lr: .nan\n", "cfg.yaml:7 field 'optim.lr'"),
    config_case("eps_infinite", BASE + "optim:\n  eps: .inf\n", "cfg.yaml:7 field 'optim.eps'"),
    config_case("weight_decay_list", BASE + "optim:\n  weight_decay: [0.1]\n", "cfg.yaml:7 field 'optim.weight_decay'"),
    config_case("betas_out_of_range", BASE + "optim:\n  betas: [0.9, 1.5]\n", "cfg.yaml:7 field 'optim.betas'", "[0, 1)"),
    config_case("betas_one_value", BASE + "optim:\n  betas: [0.9]\n", "cfg.yaml:7 field 'optim.betas.1'", "missing"),
    config_case("betas_a_string", BASE + "optim:\n  betas: fast\n", "cfg.yaml:7 field 'optim.betas'"),
    config_case("layer_lr_decay_above_1", BASE + "optim:\n  layer_lr_decay: 1.5\n", "cfg.yaml:7 field 'optim.layer_lr_decay'"),
    config_case("batch_size_fraction", BASE + "train:\n  batch_size: 1.5\n", "cfg.yaml:7 field 'train.batch_size'", "1.5"),
    config_case("batch_size_word", BASE + "train:\n  batch_size: sixteen\n", "cfg.yaml:7 field 'train.batch_size'", "'sixteen'"),
    config_case("batch_size_zero", BASE + "train:\n  batch_size: 0\n", "cfg.yaml:7 field 'train.batch_size'"),
    config_case("epochs_negative", BASE + "train:\n  epochs: -1\n", "cfg.yaml:7 field 'train.epochs'", "greater than 0"),
    config_case("grad_accum_zero", BASE + "train:\n  grad_accum: 0\n", "cfg.yaml:7 field 'train.grad_accum'"),
    config_case("max_steps_zero", BASE + "train:\n  max_steps: 0\n", "cfg.yaml:7 field 'train.max_steps'"),
    config_case("precision_half", BASE + "train:\n  precision: half\n", "cfg.yaml:7 field 'train.precision'", "'half'"),
    config_case("seed_too_big", BASE + "train:\n  seed: 1e30\n", "cfg.yaml:7 field 'train.seed'"),
    config_case("eval_split_above_1", BASE + "  eval_split: 1.5\n", "cfg.yaml:6 field 'data.eval_split'", "1.5"),
    config_case("eval_split_negative", BASE + "  eval_split: -0.1\n", "cfg.yaml:6 field 'data.eval_split'"),
    config_case("unknown_task", BASE.replace("classification", "ner"), "cfg.yaml:1 field 'task'", "'ner'"),
    config_case("unknown_schedule", BASE + "schedule:\n  name: exponential\n", "cfg.yaml:7 field 'schedule.name'", "'exponential'"),
    config_case("warmup_twice", BASE + "schedule:\n  warmup_steps: 10\n  warmup_ratio: 0.1\n", "cfg.yaml:6 field 'schedule'", "not both"),
    config_case("warmup_ratio_1", BASE + "schedule:\n  warmup_ratio: 1.0\n", "cfg.yaml:7 field 'schedule.warmup_ratio'"),
    config_case("missing_data_train", BASE.replace("  train: train.csv\n", "  eval: train.csv\n"), "cfg.yaml:4 field 'data.train'", "missing"),
    config_case("missing_data_section", "model:\n  name: minilm\n", "cfg.yaml field 'data'", "missing"),
    config_case("data_null", BASE.replace("data:\n  train: train.csv\n", "data:\n"), "cfg.yaml:4 field 'data'"),
    config_case("data_a_string", BASE.replace("data:\n  train: train.csv\n", "data: train.csv\n"), "cfg.yaml:4 field 'data'"),
    config_case("data_train_a_number", BASE.replace("train: train.csv", "train: 5"), "cfg.yaml:5 field 'data.train'", "string"),
    config_case("data_train_empty", BASE.replace("train: train.csv", "train: ''"), "cfg.yaml:5 field 'data.train'"),
    config_case("data_format_unknown", BASE + "  format: xlsx\n", "cfg.yaml:6 field 'data.format'", "'xlsx'"),
    config_case("labels_one_name", BASE + "  labels: [pos]\n", "cfg.yaml:6 field 'data.labels'"),
    config_case("labels_twice", BASE + "  labels: [pos, neg, pos]\n", "cfg.yaml:6 field 'data.labels'", "twice"),
    # a file's labels are read stripped, and a blank one is refused: such a name is a class no row could have
    config_case("labels_blank_name", BASE + "  labels: ['', pos]\n", "cfg.yaml:6 field 'data.labels'", "blank"),
    config_case("labels_padded_name", BASE + "  labels: [' pos', neg]\n", "cfg.yaml:6 field 'data.labels'", "' pos'"),
    config_case("max_rows_zero", BASE + "  max_rows: 0\n", "cfg.yaml:6 field 'data.max_rows'"),
    config_case("model_max_length_zero", BASE.replace(f"  name: {MISSING_MODEL}\n", f"  name: {MISSING_MODEL}\n  max_length: 0\n"),
                "cfg.yaml:4 field 'model.max_length'"),
    config_case("trust_remote_code_maybe", BASE.replace("model:\n", "model:\n  trust_remote_code: maybe\n"),
                "cfg.yaml:3 field 'model.trust_remote_code'", "'maybe'"),
    config_case("keep_last_zero", BASE + "checkpoint:\n  keep_last: 0\n", "cfg.yaml:7 field 'checkpoint.keep_last'"),
    config_case("checkpoint_mode_word", BASE + "checkpoint:\n  mode: maximize\n", "cfg.yaml:7 field 'checkpoint.mode'", "'maximize'"),
    config_case("checkpoint_final_word", BASE + "checkpoint:\n  final: middle\n", "cfg.yaml:7 field 'checkpoint.final'"),
    config_case("patience_zero", BASE + "early_stopping:\n  patience: 0\n", "cfg.yaml:7 field 'early_stopping.patience'"),
    config_case("early_stopping_without_eval", BASE + "  eval_split: 0\n",
                "cfg.yaml field 'early_stopping.enabled'", "needs evaluation"),
    config_case("early_stopping_without_eval_located", BASE + "  eval_split: 0\nearly_stopping:\n  patience: 2\n",
                "cfg.yaml:7 field 'early_stopping.enabled'", "needs evaluation"),
    config_case("set_without_equals", BASE, "cfg.yaml --set field 'optim.lr'", "key=value", args=("--set", "optim.lr")),
    config_case("set_empty_key", BASE, "cfg.yaml --set", "key=value", args=("--set", "=5")),
    config_case("set_empty_part", BASE, "cfg.yaml --set field 'optim..lr'", "key=value", args=("--set", "optim..lr=1")),
    config_case("set_unknown_key", BASE + "optim:\n  lr: 1.0e-3\n", "cfg.yaml --set field 'optim.lrr'", "unknown key",
                args=("--set", "optim.lrr=1")),
    config_case("set_unknown_section", BASE, "cfg.yaml --set field 'optimiser'", "unknown key", args=("--set", "optimiser.lr=1")),
    config_case("set_wrong_type", BASE + "train:\n  batch_size: 4\n", "cfg.yaml --set field 'train.batch_size'", "'big'",
                args=("--set", "train.batch_size=big")),
    config_case("set_into_a_value", BASE + "optim:\n  lr: 1.0e-3\n", "cfg.yaml --set field 'optim.lr.x'", "not a section",
                args=("--set", "optim.lr.x=1")),
    config_case("set_unknown_model_name", BASE, "cfg.yaml --set field 'model.name'", "not an embedded name",
                args=("--set", "model.name=bert-base-uncasedd")),
    config_case("unknown_model_name", BASE.replace(MISSING_MODEL, "bert-base-uncasedd"), "cfg.yaml:3 field 'model.name'",
                "not an embedded name"),
]


# ---------------------------------------------------------------- data files


def data_case(id: str, files: dict, loc: str, *says: str, data: str = "", check: bool = True,
              task: str = "classification") -> list[Case]:
    """A bad data file, run through `tunelab train` and (if `check`) `tunelab data check`.

    `files` maps names to contents (text, bytes, or a function that writes the path); the first
    is data.train. `data` holds extra lines for the config's data section. Chat and plain-text data
    (`task` chat / causal_lm) are read after the tokenizer loads, so they go through `data check` alone.
    """
    train_name = next(iter(files))

    def write_all(ws: Workspace) -> Path:
        for name, content in files.items():
            ws.write(name, content)
        return ws.root / train_name

    def build_train(ws: Workspace) -> list[str]:
        write_all(ws)
        extra = "".join(f"  {line}\n" for line in data.splitlines())
        cfg = ws.write("cfg.yaml", f"model:\n  name: {MISSING_MODEL}\ndata:\n  train: {train_name}\n{extra}")
        return ws.train_args(cfg)

    def build_check(ws: Workspace) -> list[str]:
        lm = {"chat": ["--task", "chat"], "causal_lm": ["--task", "text"]}.get(task, [])
        return ["data", "check", str(write_all(ws)), *lm]

    if task != "classification":
        return [Case(f"check-{id}", build_check, loc, says)]
    cases = [Case(f"train-{id}", build_train, loc, says)]
    if check:
        cases.append(Case(f"check-{id}", build_check, loc, says))
    return cases


HUGE = "x" * 20_000_000  # one 20 MB field: a missing quote or newline; refused, with its line

DATA_CASES = [
    # -- any format
    *data_case("missing_file", {"nope.csv": None}, "nope.csv", "not found"),
    *data_case("a_folder", {"folder.csv": FOLDER}, "folder.csv", "folder"),
    *data_case("unknown_suffix", {"train.txt": csv_with()}, "train.txt", "suffix"),
    *data_case("no_suffix", {"train": csv_with()}, "train", "suffix"),
    # -- CSV
    *data_case("csv_empty", {"train.csv": ""}, "train.csv", "empty"),
    *data_case("csv_blank_lines", {"train.csv": "\n \n\n"}, "train.csv", "empty"),
    *data_case("csv_header_only", {"train.csv": "text,label\n"}, "train.csv", "no records"),
    *data_case("csv_missing_text_column", {"train.csv": csv_with(header="sentence,label")}, "train.csv:2 field 'text'", "sentence"),
    *data_case("csv_missing_label_column", {"train.csv": csv_with(header="text,y")}, "train.csv:2 field 'label'", "missing column"),
    *data_case("csv_empty_text", {"train.csv": csv_with({3: ",neg"})}, "train.csv:3 field 'text'", "empty"),
    *data_case("csv_whitespace_text", {"train.csv": csv_with({4: '"   ",pos'})}, "train.csv:4 field 'text'", "empty"),
    *data_case("csv_empty_label", {"train.csv": csv_with({3: "good film,"})}, "train.csv:3 field 'label'", "empty"),
    *data_case("csv_whitespace_label", {"train.csv": csv_with({5: "good film,  "})}, "train.csv:5 field 'label'", "empty"),
    *data_case("csv_float_label", {"train.csv": csv_with({3: "good film,0.5"})}, "train.csv:3 field 'label'", "0.5"),
    *data_case("csv_nan_label", {"train.csv": csv_with({6: "good film,NaN"})}, "train.csv:6 field 'label'", "NaN"),
    *data_case("csv_inf_label", {"train.csv": csv_with({6: "good film,inf"})}, "train.csv:6 field 'label'", "inf"),
    *data_case("csv_one_number_among_names", {"train.csv": csv_with({4: "c,1"})}, "train.csv:4 field 'label'", "one kind"),
    *data_case("csv_first_label_a_number", {"train.csv": csv_with({2: "c,1"})}, "train.csv:2 field 'label'", "one kind"),
    *data_case("csv_one_name_among_numbers", {"train.csv": "text,label\na,0\nb,1\nc,0\nd,1\ne,pos\nf,0\n"},
               "train.csv:6 field 'label'", "one kind"),
    *data_case("csv_whole_float_label_among_names", {"train.csv": csv_with({7: "c,1.0"})}, "train.csv:7 field 'label'", "one kind"),
    *data_case("csv_too_many_fields", {"train.csv": csv_with({3: "boring, and awful,neg"})}, "train.csv:3", "3 fields"),
    *data_case("csv_too_few_fields", {"train.csv": csv_with({4: "no label here"})}, "train.csv:4", "1 fields"),
    *data_case("csv_duplicate_header", {"train.csv": csv_with(header="text,label,text")}, "train.csv:1 field 'text'", "twice"),
    *data_case("csv_unclosed_quote", {"train.csv": csv_with({3: '"never closed,neg'})}, "train.csv:3", "quote"),
    *data_case("csv_multiline_record_then_bad", {"train.csv": csv_with({2: '"two\nlines",pos', 5: "x,"})},
               "train.csv:6 field 'label'", "empty"),
    *data_case("csv_multiline_record_bad", {"train.csv": csv_with({3: '"two\nlines",'})}, "train.csv:3 field 'label'", "empty"),
    *data_case("csv_crlf_line_numbers", {"train.csv": csv_with({4: ",pos"}).replace("\n", "\r\n")}, "train.csv:4 field 'text'"),
    *data_case("csv_bom_then_bad", {"train.csv": "\ufeff" + csv_with({3: ",neg"})}, "train.csv:3 field 'text'"),
    *data_case("csv_blank_lines_count", {"train.csv": "text,label\n\ngood,pos\n\n,neg\n"}, "train.csv:5 field 'text'"),
    *data_case("csv_not_utf8", {"train.csv": csv_with().encode() + b"caf\xe9 au lait,pos\n"}, "train.csv:10", "UTF-8"),
    *data_case("csv_utf16", {"train.csv": csv_with().encode("utf-16")}, "train.csv", "UTF-16"),
    *data_case("csv_binary_nul", {"train.csv": b"text,label\nok,pos\n\x00\x01\x02\x03PK\x03\x04"}, "train.csv:3", "binary"),
    *data_case("csv_huge_field", {"train.csv": csv_with({3: HUGE + ",neg"})}, "train.csv:3", "10000000"),
    *data_case("csv_huge_quoted_field", {"train.csv": csv_with({3: f'"{HUGE}",neg'})}, "train.csv:3", "10000000"),
    # -- TSV
    *data_case("tsv_stray_tab", {"train.tsv": tsv_with({3: "boring\tand awful\tneg"})}, "train.tsv:3", "tab"),
    *data_case("tsv_missing_label_column", {"train.tsv": lines_with(["text\tscore", "good\t1", "bad\t0"], {})},
               "train.tsv:2 field 'label'"),
    *data_case("tsv_empty_text", {"train.tsv": tsv_with({2: "\tpos"})}, "train.tsv:2 field 'text'", "empty"),
    # -- JSONL
    *data_case("jsonl_broken_json", {"train.jsonl": jsonl_with({3: '{"text": "x", "label": }'})}, "train.jsonl:3", "invalid JSON"),
    *data_case("jsonl_trailing_garbage", {"train.jsonl": jsonl_with({2: '{"text": "x", "label": "pos"} x'})}, "train.jsonl:2", "invalid JSON"),
    *data_case("jsonl_line_is_array", {"train.jsonl": jsonl_with({2: '["good", "pos"]'})}, "train.jsonl:2", "list"),
    *data_case("jsonl_line_is_number", {"train.jsonl": jsonl_with({4: "42"})}, "train.jsonl:4", "int"),
    *data_case("jsonl_pretty_array", {"train.jsonl": json_array(OBJS)}, "train.jsonl:1", "invalid JSON"),
    *data_case("jsonl_null_text", {"train.jsonl": jsonl_with({2: '{"text": null, "label": "neg"}'})}, "train.jsonl:2 field 'text'", "null"),
    *data_case("jsonl_numeric_text", {"train.jsonl": jsonl_with({3: '{"text": 42, "label": "pos"}'})}, "train.jsonl:3 field 'text'", "int"),
    *data_case("jsonl_list_text", {"train.jsonl": jsonl_with({3: '{"text": ["a", "b"], "label": "pos"}'})}, "train.jsonl:3 field 'text'", "list"),
    *data_case("jsonl_empty_text", {"train.jsonl": jsonl_with({5: '{"text": "", "label": "pos"}'})}, "train.jsonl:5 field 'text'", "empty"),
    *data_case("jsonl_whitespace_text", {"train.jsonl": jsonl_with({5: '{"text": " \\t\\n", "label": "pos"}'})},
               "train.jsonl:5 field 'text'", "empty"),
    *data_case("jsonl_missing_text_key", {"train.jsonl": jsonl_with({6: '{"txt": "good", "label": "neg"}'})},
               "train.jsonl:6 field 'text'", "missing"),
    *data_case("jsonl_missing_label_key", {"train.jsonl": jsonl_with({3: '{"text": "good"}'})}, "train.jsonl:3 field 'label'", "missing"),
    *data_case("jsonl_null_label", {"train.jsonl": jsonl_with({2: '{"text": "good", "label": null}'})}, "train.jsonl:2 field 'label'", "empty"),
    *data_case("jsonl_empty_label", {"train.jsonl": jsonl_with({2: '{"text": "good", "label": ""}'})}, "train.jsonl:2 field 'label'", "empty"),
    *data_case("jsonl_bool_label", {"train.jsonl": jsonl_with({4: '{"text": "good", "label": true}'})}, "train.jsonl:4 field 'label'", "boolean"),
    *data_case("jsonl_float_label", {"train.jsonl": jsonl_with({2: '{"text": "good", "label": 0.5}'})}, "train.jsonl:2 field 'label'", "0.5"),
    *data_case("jsonl_nan_label", {"train.jsonl": jsonl_with({7: '{"text": "good", "label": NaN}'})}, "train.jsonl:7 field 'label'", "nan"),
    *data_case("jsonl_infinite_label", {"train.jsonl": jsonl_with({7: '{"text": "good", "label": Infinity}'})},
               "train.jsonl:7 field 'label'", "inf"),
    *data_case("jsonl_list_label", {"train.jsonl": jsonl_with({3: '{"text": "good", "label": ["pos"]}'})}, "train.jsonl:3 field 'label'", "list"),
    *data_case("jsonl_object_label", {"train.jsonl": jsonl_with({3: '{"text": "good", "label": {"y": 1}}'})}, "train.jsonl:3 field 'label'", "dict"),
    *data_case("jsonl_one_number_among_names", {"train.jsonl": jsonl_with({3: '{"text": "a", "label": 1}'})},
               "train.jsonl:3 field 'label'", "one kind"),
    *data_case("jsonl_not_utf8", {"train.jsonl": jsonl_with().encode() + b'{"text": "\xff\xfe", "label": "pos"}\n'}, "train.jsonl:9", "UTF-8"),
    *data_case("jsonl_blank_lines_count", {"train.jsonl": "\n" + jsonl_with({2: "{oops"})}, "train.jsonl:3", "invalid JSON"),
    *data_case("jsonl_line_separator_in_text",
               {"train.jsonl": jsonl_with({1: '{"text": "one\u2028two\u2029three", "label": "pos"}', 3: "{oops"})},
               "train.jsonl:3", "invalid JSON"),
    # JSON keeps the last of two equal keys: a row's label (or text) would be read silently as whichever came last
    *data_case("jsonl_label_key_twice", {"train.jsonl": jsonl_with({3: '{"text": "good", "label": "pos", "label": "neg"}'})},
               "train.jsonl:3 field 'label'", "twice"),
    *data_case("json_label_key_twice", {"train.json": json_array(OBJS[:2]).replace('"label": "neg"}', '"label": "neg", "label": "pos"}')},
               "train.json:3 field 'label'", "twice"),
    *data_case("jsonl_huge_text", {"train.jsonl": jsonl_with({2: json.dumps({"text": HUGE, "label": "neg"})})},
               "train.jsonl:2 field 'text'", "10000000"),
    # -- JSON
    *data_case("json_truncated_array", {"train.json": json_array(OBJS)[:-40]}, "train.json:9", "invalid JSON"),
    *data_case("json_top_level_object", {"train.json": json.dumps({"text": "a", "label": "pos"})}, "train.json:1", "list of objects"),
    *data_case("json_top_level_number", {"train.json": "42\n"}, "train.json:1", "list of objects"),
    *data_case("json_not_json", {"train.json": "{text: a}\n"}, "train.json:1", "invalid JSON"),
    *data_case("json_empty_array", {"train.json": "[]\n"}, "train.json", "no records"),
    *data_case("json_array_of_strings", {"train.json": json_array(["good", "bad"])}, "train.json:2", "str"),
    *data_case("json_missing_comma", {"train.json": json_array(OBJS).replace("},\n", "}\n", 1)}, "train.json:3", "invalid JSON"),
    *data_case("json_extra_data", {"train.json": json_array(OBJS) + "[]\n"}, "train.json:10", "extra data"),
    *data_case("json_null_label", {"train.json": json_array(OBJS[:3] + [{"text": "x", "label": None}] + OBJS[3:])},
               "train.json:5 field 'label'", "empty"),
    *data_case("json_data_key_non_object", {"train.json": json.dumps({"data": OBJS[:2] + [5]})}, "train.json record 2", "int"),
    *data_case("json_data_key_null_text", {"train.json": json.dumps({"data": OBJS[:1] + [{"text": None, "label": "neg"}]})},
               "train.json record 1 field 'text'", "null"),
    # -- Parquet
    *data_case("parquet_garbage", {"train.parquet": b"PAR1 this is not parquet at all PAR1"}, "train.parquet", "Parquet"),
    *data_case("parquet_truncated", {"train.parquet": truncated_parquet}, "train.parquet", "Parquet"),
    *data_case("parquet_no_rows", {"train.parquet": parquet({"text": [], "label": []}, {"text": "string", "label": "string"})},
               "train.parquet", "no records"),
    *data_case("parquet_null_text", {"train.parquet": parquet({"text": ["a", "b", None, "d"], "label": ["pos", "neg", "pos", "neg"]})},
               "train.parquet record 2 field 'text'", "null"),
    *data_case("parquet_numeric_text", {"train.parquet": parquet({"text": [1, 2], "label": ["pos", "neg"]})},
               "train.parquet record 0 field 'text'", "int"),
    *data_case("parquet_missing_label_column", {"train.parquet": parquet({"text": ["a", "b"], "y": [0, 1]})},
               "train.parquet record 0 field 'label'", "missing column"),
    *data_case("parquet_float_label", {"train.parquet": parquet({"text": ["a", "b"], "label": [1.0, 0.5]})},
               "train.parquet record 1 field 'label'", "0.5"),
    *data_case("parquet_nan_label", {"train.parquet": parquet({"text": ["a", "b", "c"], "label": [1.0, 0.0, float("nan")]})},
               "train.parquet record 2 field 'label'", "nan"),
    *data_case("parquet_bool_label", {"train.parquet": parquet({"text": ["a", "b"], "label": [True, False]})},
               "train.parquet record 0 field 'label'", "boolean"),
    *data_case("parquet_list_label", {"train.parquet": parquet({"text": ["a", "b"], "label": [[1], [0]]})},
               "train.parquet record 0 field 'label'", "list"),
    # -- rules that need the config
    *data_case("label_not_in_declared_labels", {"train.csv": csv_with({5: "meh film,meh"})}, "train.csv:5 field 'label'", "'meh'",
               data="labels: [neg, pos]", check=False),
    *data_case("label_id_out_of_declared_range", {"train.csv": csv_with({5: "meh film,7"})}, "train.csv:5 field 'label'", "7",
               data="labels: [neg, pos]", check=False),
    *data_case("custom_text_column_missing", {"train.csv": csv_with()}, "train.csv:2 field 'sentence'", "text_column",
               data="text_column: sentence", check=False),
    *data_case("pair_column_missing", {"train.csv": csv_with()}, "train.csv:2 field 'hypothesis'", "missing column", "data.text_pair_column",
               data="text_pair_column: hypothesis", check=False),
    *data_case("format_json_for_csv", {"train.csv": csv_with()}, "train.csv:1", "invalid JSON", data="format: json", check=False),
    *data_case("only_one_class", {"train.csv": csv_with(rows=[(t, "pos") for t, _ in ROWS])}, "train.csv field 'label'",
               "only one label", check=False),
    *data_case("eval_missing_file", {"train.csv": csv_with()}, "eval.csv", "not found", data="eval: eval.csv", check=False),
    *data_case("eval_label_not_in_training", {"train.csv": csv_with(), "eval.csv": csv_with({3: "meh film,meh"})},
               "eval.csv:3 field 'label'", "training data", data="eval: eval.csv", check=False),
    *data_case("eval_broken_jsonl", {"train.csv": csv_with(), "eval.jsonl": jsonl_with({2: "{"})}, "eval.jsonl:2", "invalid JSON",
               data="eval: eval.jsonl", check=False),
    *data_case("eval_empty_text", {"train.csv": csv_with(), "eval.csv": csv_with({2: ",pos"})}, "eval.csv:2 field 'text'", "empty",
               data="eval: eval.csv", check=False),
]



def preference_case(id: str, content: str, loc: str, *says: str, name: str = "train.jsonl") -> Case:
    def build(ws: Workspace) -> list[str]:
        ws.write(name, content)
        return ws.train_args(ws.write("cfg.yaml", f"task: preference\nmodel:\n  name: {MISSING_MODEL}\ndata:\n  train: {name}\n"))

    return Case(f"preference-{id}", build, loc, says)


PAIR = '{"prompt": "name a fruit", "chosen": "an apple", "rejected": "a fish"}'
DATA_CASES += [
    preference_case("chosen_key_twice", PAIR + "\n" + PAIR.replace('"rejected"', '"chosen": "a pear", "rejected"') + "\n",
                    "train.jsonl:2 field 'chosen'", "twice"),
    preference_case("role_key_twice_in_a_message",
                    PAIR + '\n{"prompt": [{"role": "user", "role": "system", "content": "hi"}], "chosen": "a", "rejected": "b"}\n',
                    "train.jsonl:2 field 'role'", "twice"),
]


# ---------------------------------------------------------------- models


def model_case(id: str, make: Callable[[Workspace], Path], loc: str, *says: str, checkpoint: str = "") -> Case:
    """A bad model folder (or name) in an otherwise valid config with valid data."""

    def build(ws: Workspace) -> list[str]:
        ws.write("train.csv", csv_with())
        name = make(ws)
        extra = f"checkpoint:\n  metric: {checkpoint}\n" if checkpoint else ""
        cfg = ws.write("cfg.yaml", f"model:\n  name: {name}\n  max_length: 32\ndata:\n  train: train.csv\n"
                                   f"train:\n  epochs: 1\n  batch_size: 4\n{extra}")
        return ws.train_args(cfg)

    return Case(f"model-{id}", build, loc, says)


GARBAGE = b"\x93\x00garbage, not a safetensors file" * 4


def truncated_weights(path: Path) -> None:
    """A real safetensors header whose tensor data was cut off."""
    src = next(path.parent.parent.glob("model-src/*.safetensors"), None)
    data = src.read_bytes() if src else b""
    path.write_bytes(data[: len(data) // 3])


MODEL_CASES = [
    model_case("path_not_found", lambda ws: ws.root / "no-such-model", "no-such-model field 'model.name'", "not found"),
    model_case("relative_path_not_found", lambda ws: "./no-such-model", "no-such-model field 'model.name'", "not found"),
    model_case("unknown_name", lambda ws: "bert-base-uncasedd", "cfg.yaml:2 field 'model.name'", "not an embedded name"),
    model_case("folder_without_config", lambda ws: ws.write("empty-model/README.md", "hi").parent,
               "empty-model field 'model.name'", "config.json"),
    model_case("a_file_not_a_folder", lambda ws: ws.write("weights.safetensors", GARBAGE), "weights.safetensors field 'model.name'", "folder"),
    model_case("config_without_weights", lambda ws: ws.model(drop=("*.safetensors",)), "model field 'model.name'", "no weights"),
    model_case("corrupt_safetensors", lambda ws: ws.model(files={"model.safetensors": GARBAGE}),
               "model.safetensors field 'model.name'", "safetensors"),
    model_case("truncated_safetensors",
               lambda ws: (ws.model("model-src"), ws.model(files={"model.safetensors": truncated_weights}))[1],
               "model.safetensors field 'model.name'", "safetensors"),
    model_case("config_json_not_json", lambda ws: ws.model(files={"config.json": "{not json"}), "config.json field 'model.name'", "JSON"),
    model_case("config_json_unknown_type", lambda ws: ws.model(files={"config.json": '{"model_type": "no-such-arch"}'}),
               "model field 'model.name'", "no-such-arch"),
    model_case("no_tokenizer", lambda ws: ws.model(drop=("tokenizer*", "special_tokens_map.json", "vocab.txt")),
               "model field 'model.name'", "tokenizer"),
    model_case("unknown_checkpoint_metric", lambda ws: ws.model(), "cfg.yaml:10 field 'checkpoint.metric'", "eval_bleu",
               checkpoint="eval_bleu"),
]


# ---------------------------------------------------------------- run dir and resume


def run_dir_case(id: str, prepare: Callable[[Workspace], None], loc: str, *says: str, args=(), preexists=False) -> Case:
    def build(ws: Workspace) -> list[str]:
        ws.write("train.csv", csv_with())
        prepare(ws)
        return ws.train_args(ws.write("cfg.yaml", BASE), *args)

    return Case(f"rundir-{id}", build, loc, says, out_preexists=preexists)


RUN_DIR_CASES = [
    run_dir_case("output_dir_is_a_file", lambda ws: ws.write("run", "not a folder"), "run", "is a file", preexists=True),
    run_dir_case("output_dir_holds_a_run", lambda ws: ws.write("run/metrics.jsonl", "{}\n"), "run", "--resume", preexists=True),
    run_dir_case("resume_from_missing_checkpoint", lambda ws: None, "no-ckpt", "resume", args=("--resume", "no-ckpt")),
]


# ---------------------------------------------------------------- tunelab eval


def eval_case(id: str, make_model: Callable[[Workspace], Path], files: dict, loc: str, *says: str, args=()) -> Case:
    def build(ws: Workspace) -> list[str]:
        for name, content in files.items():
            ws.write(name, content)
        return ["eval", str(make_model(ws)), "--data", str(ws.root / next(iter(files))), *args]

    return Case(f"eval-{id}", build, loc, says)


EVAL_CASES = [
    eval_case("missing_model_dir", lambda ws: ws.root / "no-such-model", {"eval.csv": csv_with()}, "no-such-model", "not found"),
    eval_case("model_dir_without_config", lambda ws: ws.write("empty/README.md", "hi").parent, {"eval.csv": csv_with()},
              "empty", "config.json"),
    eval_case("model_dir_is_a_file", lambda ws: ws.write("model.bin", GARBAGE), {"eval.csv": csv_with()}, "model.bin", "folder"),
    eval_case("corrupt_weights", lambda ws: ws.model(files={"model.safetensors": GARBAGE}), {"eval.csv": csv_with()},
              "model.safetensors", "safetensors"),
    # tiny_bert's labels are LABEL_0 / LABEL_1 (ids 0 and 1)
    eval_case("label_model_does_not_know", lambda ws: ws.model(), {"eval.csv": csv_with()}, "eval.csv:2 field 'label'", "'pos'"),
    eval_case("label_id_out_of_range", lambda ws: ws.model(), {"eval.csv": "text,label\ngood,0\nbad,1\nmeh,5\n"},
              "eval.csv:4 field 'label'", "5"),
    eval_case("missing_data_file", lambda ws: ws.model(), {"nope.csv": None}, "nope.csv", "not found"),
    eval_case("broken_data_line", lambda ws: ws.model(), {"eval.jsonl": jsonl_with({4: '{"text": "x",'})}, "eval.jsonl:4", "invalid JSON"),
    eval_case("wrong_text_column", lambda ws: ws.model(), {"eval.csv": csv_with()}, "eval.csv:2 field 'sentence'", "missing column",
              args=("--text-column", "sentence")),
]


CASES = CONFIG_CASES + DATA_CASES + MODEL_CASES + RUN_DIR_CASES + EVAL_CASES


@pytest.mark.unit
def test_case_ids_are_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and len(CASES) >= 60


def location_pattern(loc: str) -> str:
    """`error: <folder>/LOC: message`, where a ':' may also close the file:line part (GNU style)."""
    rx = re.escape(loc)
    rx = re.sub(r"\\ (?=record\\ |field\\ |\\-\\-set)", ":? ", rx)
    return rf"error: (\S*/)?{rx}: \S"


@pytest.mark.unit
def test_location_pattern():
    rx = location_pattern("train.csv:4 field 'label'")
    assert re.match(rx, "error: /tmp/x/train.csv:4 field 'label': label is empty")
    assert re.match(rx, "error: /tmp/x/train.csv:4: field 'label': label is empty")
    assert not re.match(rx, "error: /tmp/x/train.csv:40: field 'label': label is empty")
    assert not re.match(rx, "error: /tmp/x/train.csv:4: label is empty")
    assert re.match(location_pattern("c.yaml --set field 'a.b'"), "error: c.yaml: --set: field 'a.b': unknown")


def _snapshot(path: Path):
    if path.is_file():
        return path.read_bytes()
    return sorted((str(p.relative_to(path)), p.read_bytes() if p.is_file() else None) for p in path.rglob("*"))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.e2e
def test_bad_input_exits_2_with_one_located_line(case: Case, tmp_path: Path, request: pytest.FixtureRequest):
    ws = Workspace(tmp_path, request)
    args = case.build(ws)
    before = _snapshot(ws.out) if case.out_preexists else None

    result = runner.invoke(app, args)

    shown = f"exit {result.exit_code}\nstderr:\n{result.stderr}\nstdout:\n{result.stdout[-2000:]}"
    assert result.exit_code == 2, shown
    assert "Traceback" not in result.output, shown
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, shown
    assert result.stdout == "", shown
    line = lines[0]
    assert re.match(location_pattern(case.loc), line), f"expected location {case.loc!r} in:\n{line}"
    for word in case.says:
        assert word in line, f"expected {word!r} in:\n{line}"
    if case.out_preexists:
        assert _snapshot(ws.out) == before, "a bad input changed the existing output dir"
    else:
        assert not ws.out.exists(), "a bad input left a run dir behind"


@pytest.mark.parametrize("kind", ["config", "data"])
@pytest.mark.e2e
def test_a_real_process_prints_one_line_too(kind: str, tmp_path: Path):
    """Outside CliRunner: nothing else (log lines, warnings, progress bars) reaches the real stderr."""
    ws = Workspace(tmp_path, None)
    ws.write("train.csv", csv_with({4: "no label here"}))
    if kind == "config":
        args = ws.train_args(ws.write("cfg.yaml", BASE + "optim:\n  lr: fast\n"))
        loc = "cfg.yaml:7 field 'optim.lr'"
    else:
        args, loc = ["data", "check", str(ws.root / "train.csv")], "train.csv:4"
    proc = subprocess.run([sys.executable, "-m", "tunelab.cli", *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert re.match(location_pattern(loc), proc.stderr), proc.stderr
    assert not ws.out.exists()


def train_in_a_process(ws: Workspace, cfg: Path, loc: str) -> None:
    """`tunelab train cfg` in a real process (its own data cache): exit 2, the one located line alone on stderr."""
    env = {**__import__("os").environ, "TUNELAB_DATA_CACHE": str(ws.root / "cache")}
    proc = subprocess.run([sys.executable, "-m", "tunelab.cli", *ws.train_args(cfg)], capture_output=True, text=True,
                          timeout=300, cwd=ws.root, env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert re.match(location_pattern(loc), proc.stderr), proc.stderr
    assert not ws.out.exists()


PAIRS = [{"prompt": "name a fruit", "chosen": "an apple", "rejected": "a fish"},
         {"prompt": "say hello", "chosen": "hello there", "rejected": "two plus two"}]
REAL_PROCESS_DATA = {  # id: (files, data section lines, task, the location printed)
    # the first file's rows are good: the check pass reads (and caches) them before it finds the bad one
    "eval_label_not_in_training": ({"train.csv": csv_with(), "eval.csv": csv_with({3: "meh film,meh"})},
                                   "  train: train.csv\n  eval: eval.csv\n", "classification", "eval.csv:3 field 'label'"),
    "label_not_declared": ({"train.csv": csv_with({5: "meh film,meh"})}, "  train: train.csv\n  labels: [neg, pos]\n",
                           "classification", "train.csv:5 field 'label'"),
    "second_source_bad": ({"a.csv": csv_with(), "b.jsonl": jsonl_with({3: "{oops"})},
                          "  train:\n    - path: a.csv\n    - path: b.jsonl\n", "classification", "b.jsonl:3"),
    "good_data_missing_model": ({"train.csv": csv_with()}, "  train: train.csv\n", "classification",
                                f"{MISSING_MODEL[2:]} field 'model.name'"),
    "preference_second_source_bad": ({"a.jsonl": jsonl_with(objs=PAIRS),
                                      "b.jsonl": jsonl_with(objs=PAIRS + [{**PAIRS[0], "rejected": "an apple"}])},
                                     "  train:\n    - path: a.jsonl\n    - path: b.jsonl\n", "preference",
                                     "b.jsonl:3 field 'rejected'"),
    "preference_good_data_missing_model": ({"a.jsonl": jsonl_with(objs=PAIRS)}, "  train: a.jsonl\n", "preference",
                                           f"{MISSING_MODEL[2:]} field 'model.name'"),
}


@pytest.mark.parametrize("id", sorted(REAL_PROCESS_DATA))
@pytest.mark.e2e
def test_a_real_process_prints_one_line_when_good_data_came_first(id: str, tmp_path: Path):
    """The check pass caches what it read of each good source (a meta-only entry) before it reaches the
    bad one, or the model: that entry is no news, so it logs nothing at INFO, and stderr holds the error
    alone (the CliRunner cases above never see log lines: logging writes to the first stderr it met)."""
    files, data, task, loc = REAL_PROCESS_DATA[id]
    ws = Workspace(tmp_path, None)
    for name, content in files.items():
        ws.write(name, content)
    cfg = ws.write("cfg.yaml", f"task: {task}\nmodel:\n  name: {MISSING_MODEL}\ndata:\n{data}")
    train_in_a_process(ws, cfg, loc)


CHATS = [{"messages": [{"role": "user", "content": "what colour is the sky"},
                       {"role": "assistant", "content": "the sky is blue"}]}] * 4
NO_ANSWER = {"messages": [{"role": "user", "content": "hi"}]}
LONG_PROMPT = {"prompt": "what colour is the sky " * 40, "chosen": "blue", "rejected": "red"}
ENCODE_TIME = {  # found only while encoding, with the model's tokenizer: after a good source was encoded (and logged)
    "chat_eval_row_bad": ({"a.jsonl": jsonl_with(objs=CHATS), "e.jsonl": jsonl_with(objs=CHATS + [NO_ANSWER])},
                          "  train: a.jsonl\n  eval: e.jsonl\n", "chat", "e.jsonl:5 field 'messages'"),
    "chat_second_source_bad": ({"a.jsonl": jsonl_with(objs=CHATS), "b.jsonl": jsonl_with(objs=CHATS + [NO_ANSWER])},
                               "  train:\n    - path: a.jsonl\n    - path: b.jsonl\n", "chat", "b.jsonl:5 field 'messages'"),
    "preference_eval_prompt_too_long": ({"a.jsonl": jsonl_with(objs=PAIRS), "e.jsonl": jsonl_with(objs=PAIRS + [LONG_PROMPT])},
                                        "  train: a.jsonl\n  eval: e.jsonl\n", "preference", "e.jsonl:3 field 'prompt'"),
}


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    from tiny_models import tiny_llama_folder

    return tiny_llama_folder(tmp_path_factory.mktemp("tiny_llama"))


@pytest.mark.parametrize("id", sorted(ENCODE_TIME))
@pytest.mark.e2e
def test_a_real_process_prints_one_line_for_bad_data_found_while_encoding(id: str, tmp_path: Path, tiny_llama_dir):
    """The log lines of the sources encoded before the bad one (and of the model's loading) are held back
    while the task is set up and dropped when the setup ends in bad input (compose.setup_task / prepare_data)."""
    files, data, task, loc = ENCODE_TIME[id]
    ws = Workspace(tmp_path, None)
    for name, content in files.items():
        ws.write(name, content)
    cfg = ws.write("cfg.yaml", f"task: {task}\nmethod: lora\nmodel:\n  name: {tiny_llama_dir}\n  max_length: 64\n"
                               f"data:\n{data}train:\n  epochs: 1\n  batch_size: 2\n")
    train_in_a_process(ws, cfg, loc)
