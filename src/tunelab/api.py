"""The Python API: train, evaluate, generate, plan and load from a notebook or a script.

Every function here is the library call the CLI verb makes, with Python values in place of
files and flags: a config may be a path, a dict or a `Config`; data may be a file path, a list of
dicts or a `datasets.Dataset`; callbacks are plain functions on the rows the run writes. Errors
are the CLI's: `tunelab.InputError` with the same file / line / field (a record of in-memory
data is named `train_data record N`).

In-memory data is written once as JSONL to `$TUNELAB_CACHE/api-data/<sha256>.jsonl` (content
addressed: the same rows give the same file, so `resume="auto"` finds the same data) and read by
the same readers as a file, so validation, formats and error wording are identical.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tunelab.errors import InputError

Row = dict[str, Any]


@dataclass
class RunResult:
    """What `train` returns: the summary (as in summary.json), where things are, the final metrics."""

    summary: dict
    run_dir: Path
    paths: dict[str, Path] = field(default_factory=dict)

    @property
    def status(self) -> str:
        return self.summary["status"]

    @property
    def metrics(self) -> dict:
        """The final evaluation (summary.json `final`), or {} when the run did not finish."""
        return self.summary.get("final") or {}

    @property
    def final(self) -> Path:
        return self.paths["final"]

    def rows(self) -> list[Row]:
        """Every row of metrics.jsonl (step rows, eval rows, event rows)."""
        from tunelab.monitor.metrics_log import read_metrics

        return list(read_metrics(self.paths["metrics"]))


class Callbacks:
    """Plain functions on the run's rows, as a logger (`log(row)`, `close()`): `on_log` gets every
    training-step row (loss, lr, grad_norm, ...), `on_eval` every evaluation row (eval_* keys, the
    untouched model's first), `on_save` a row per checkpoint (step, checkpoint, is_best), `on_row`
    everything, health events included. A callback that raises is dropped with one warning and
    the run goes on (as for any logger; summary.json `loggers` records it)."""

    def __init__(self, on_log: Callable | None = None, on_eval: Callable | None = None,
                 on_save: Callable | None = None, on_row: Callable | None = None):
        self.on_log, self.on_eval, self.on_save, self.on_row = on_log, on_eval, on_save, on_row

    def log(self, row: Row) -> None:
        if self.on_row:
            self.on_row(row)
        if row.get("event") == "save":
            if self.on_save:
                self.on_save(row)
        elif "event" in row:
            return
        elif any(k.startswith("eval_") for k in row):
            if self.on_eval:
                self.on_eval(row)
        elif self.on_log:
            self.on_log(row)

    def close(self) -> None:
        pass


def _callbacks(callbacks) -> Callbacks | None:
    """None, a Callbacks, one function (every row), or a dict {"log"|"eval"|"save"|"row": function}."""
    if callbacks is None or isinstance(callbacks, Callbacks):
        return callbacks
    if callable(callbacks):
        return Callbacks(on_row=callbacks)
    if isinstance(callbacks, dict):
        unknown = set(callbacks) - {"log", "eval", "save", "row"}
        if unknown:
            raise InputError(f"unknown callback kind {sorted(unknown)[0]!r}; use log, eval, save or row",
                             field="callbacks")
        return Callbacks(**{f"on_{k}": v for k, v in callbacks.items()})
    raise InputError("callbacks: give a function, a dict {log|eval|save|row: function} or tunelab.api.Callbacks",
                     field="callbacks")


# ---------------------------------------------------------------- config and data as Python values


def as_config(config, overrides: list[str] | None = None, data: dict[str, str] | None = None):
    """A `Config` from a path (YAML), a dict or a `Config` (copied: the caller's stays as it was).

    `data`: {"train": path, "eval": path} set as data.train / data.eval (before validation for a
    dict, so a dict config may leave them out).
    """
    from tunelab.config import Config, apply_overrides, config_from_dict, given_keys, load_config

    data = data or {}
    if isinstance(config, dict):
        raw = json.loads(json.dumps(config, default=str))
        if data:
            raw["data"] = {**(raw.get("data") or {}), **data}
        return config_from_dict(apply_overrides(raw, overrides or []))
    if isinstance(config, Config):  # only the keys its user set count as set: the defaults re-resolve
        cfg = (config_from_dict(apply_overrides(given_keys(config), overrides))
               if overrides else config.model_copy(deep=True))
    elif isinstance(config, (str, Path)):
        cfg = load_config(config, overrides or [])
    else:
        raise InputError(f"config must be a path, a dict or a tunelab Config, got {type(config).__name__}",
                         field="config")
    for key, path in data.items():
        setattr(cfg.data, key, path)
    return cfg


def _data_paths(train_data, eval_data) -> dict[str, str]:
    """{"train": path, "eval": path} for the data given as Python values (None: the config's own)."""
    given = (("train", "train_data", train_data), ("eval", "eval_data", eval_data))
    return {key: cache_records(value, name) for key, name, value in given if value is not None}


def _records(data, name: str) -> list[Row]:
    if isinstance(data, list):
        rows = data
    elif hasattr(data, "to_list") and hasattr(data, "column_names"):  # datasets.Dataset
        rows = data.to_list()
    else:
        raise InputError(f"{name} must be a file path, a list of dicts or a datasets.Dataset, got "
                         f"{type(data).__name__}", field=name)
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise InputError(f"expected a dict, got {type(row).__name__}", where=f"{name} record {i}", field=name)
    if not rows:
        raise InputError("no records", field=name)
    return rows


def cache_records(data, name: str) -> str:
    """The path of a JSONL file holding `data` (written once per content), for the file readers."""
    from tunelab.models.gguf import cache_root

    if isinstance(data, (str, Path)):
        return str(Path(data).expanduser().resolve())
    rows = _records(data, name)
    try:
        text = "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in rows)
    except (TypeError, ValueError) as e:
        raise InputError(f"records must be JSON values (str, number, list, dict): {e}", field=name) from None
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]
    path = cache_root() / "api-data" / f"{name}-{digest}.jsonl"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{id(rows)}")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    return str(path)


def _name_records(e: InputError, files: dict[str, str]) -> InputError:
    """An error about a cached data file, re-worded to name the Python value (`train_data record 3`)."""
    for name, path in files.items():
        if e.file and Path(e.file).resolve() == Path(path).resolve():
            where = f"{name} record {e.line - 1}" if e.line else (e.where or name)
            return InputError(e.message, field=e.field, where=where)
    return e


# ---------------------------------------------------------------- the verbs


def train(config, *, train_data=None, eval_data=None, output_dir: str | Path | None = None, callbacks=None,
          overrides: list[str] | None = None, resume: str | None = None, show_progress: bool = False) -> RunResult:
    """Fine-tune per `config`; the run dir is written exactly as `tunelab train` writes it.

    `train_data` / `eval_data` replace `data.train` / `data.eval`; `overrides` are `--set` items;
    `callbacks`: a function (every row), a dict {"log", "eval", "save", "row": function} or a
    `Callbacks`. A run that diverged or was interrupted returns normally: check `result.status`.
    """
    paths = _data_paths(train_data, eval_data)
    cfg = as_config(config, overrides, paths)
    from tunelab.run import run_training

    try:
        summary = run_training(cfg, output_dir, config_path=config if isinstance(config, (str, Path)) else None,
                               resume=resume, show_progress=show_progress, callbacks=_callbacks(callbacks))
    except InputError as e:
        raise _name_records(e, {f"{k}_data": v for k, v in paths.items()}) from None
    run_dir = Path(summary["run_dir"])
    files = {k: run_dir / v for k, v in (("config", "config.yaml"), ("metrics", "metrics.jsonl"),
                                         ("summary", "summary.json"), ("report", "report.html"),
                                         ("final", "final"), ("checkpoints", "checkpoints"))}
    return RunResult(summary=summary, run_dir=run_dir, paths=files)


def _model_folder(run_or_final: str | Path) -> Path:
    path = Path(run_or_final)
    return path / "final" if (path / "final").is_dir() else path


def load(run_or_final: str | Path, kind: str | None = None):
    """(model, tokenizer) of a run dir or a model / adapter folder, adapter applied, eval mode.

    `kind`: "causal_lm" or "classifier"; by default read from the folder (a run's config, an
    adapter's task, or the model's architecture).
    """
    from tunelab.models.saved import load_saved

    folder = _model_folder(run_or_final)
    model, tokenizer = load_saved(folder, kind or _kind(folder))
    return model.eval(), tokenizer


def _kind(folder: Path) -> str:
    from tunelab.export.source import is_classifier

    return "classifier" if is_classifier(folder) else "causal_lm"


def evaluate(model_or_run: str | Path, data, *, text_column: str = "text", label_column: str = "label",
             batch_size: int = 64, max_length: int = 128) -> dict:
    """Metrics of a saved model on labelled data (classification: loss, accuracy, macro-F1, per class,
    confusion matrix) or on chat / text data (causal LM: loss, perplexity, token accuracy)."""
    folder = _model_folder(model_or_run)
    path = cache_records(data, "data")
    try:
        if _kind(folder) == "classifier":
            from tunelab.evaluate.saved_model import evaluate_saved_classifier

            return evaluate_saved_classifier(folder, path, text_column=text_column, label_column=label_column,
                                             batch_size=batch_size, max_length=max_length)
        return _evaluate_lm(folder, path, batch_size, max_length)
    except InputError as e:
        raise _name_records(e, {"data": path}) from None


def _evaluate_lm(folder: Path, path: str, batch_size: int, max_length: int) -> dict:
    from tunelab.config import config_from_dict
    from tunelab.evaluate.lm import lm_metrics
    from tunelab.tasks.causal_lm import eval_batches, read_and_encode

    model, tok = load(folder, "causal_lm")
    data_kind = "chat" if tok.chat_template else "causal_lm"
    cfg = config_from_dict({"task": data_kind, "data": {"train": path}})
    _, examples, _, _ = read_and_encode(path, cfg.data, tok, max_length, data_kind)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    metrics = lm_metrics(model, eval_batches(examples, pad, False, max_length, batch_size))
    return {**metrics, "rows": len(examples)}


def generate(model, prompt: str | list[dict], *, tokenizer=None, system: str | None = None,
             max_new_tokens: int = 256, temperature: float = 0.0, seed: int = 0) -> dict:
    """One assistant reply with the model's own chat template, stopping at the end of the turn.

    `model`: a run dir / model folder (loaded here) or a model already loaded (give `tokenizer`);
    `prompt`: the user's message, or a whole conversation as [{"role", "content"}, ...].
    """
    from tunelab.evaluate.generate import generate_reply

    if isinstance(model, (str, Path)):
        model, tokenizer = load(model, "causal_lm")
    elif tokenizer is None:
        raise InputError("a loaded model needs its tokenizer: generate(model, prompt, tokenizer=tok)", field="tokenizer")
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    if system and not (messages and messages[0].get("role") == "system"):
        messages = [{"role": "system", "content": system}] + messages
    return generate_reply(model, tokenizer, messages, max_new_tokens=max_new_tokens, temperature=temperature,
                          seed=seed)


def plan(config, *, train_data=None, eval_data=None, overrides: list[str] | None = None, measure_steps: int = 0,
         price_per_hour: float | None = None, suggestions: bool = True, nproc: int = 1) -> dict:
    """`tunelab plan` as a dict: peak memory, steps, FLOPs, time and cost of a config, and what-ifs."""
    from tunelab.plan.planner import make_plan

    cfg = as_config(config, overrides, _data_paths(train_data, eval_data))
    return make_plan(cfg, measure_steps=measure_steps, price_per_hour=price_per_hour, suggestions=suggestions,
                     nproc=nproc)
