"""`tunelab data clean`: read a data file, drop rows by the curation rules, write the rest.

The file is read with the same readers and per-record validation as training, with one
difference: a row that training would refuse only because it has nothing to learn (an empty
text, an empty assistant turn, no assistant turn) is counted and dropped instead of stopping the
run. Every other problem (a broken line, a missing column, a bad label) is still an InputError
with exit 2: cleaning removes rows, it does not guess what a malformed one meant.

With an eval file, the eval rows get the same rules plus leakage (their normalised text or
conversation appears in the training file as read), and go to their own output file.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.data.chat import Message, detect_chat_format, parse_record, read_chat_data
from tunelab.data.classification import check_one_kind, record_label, record_text, to_id
from tunelab.data.curate import Curated, Filters, Row, conversation_key, curate, describe, normalize_text
from tunelab.data.readers import DroppableRowError, Record, read_records
from tunelab.data.writers import output_format, write_records
from tunelab.errors import InputError

TASKS = ("auto", "classification", "chat", "text")
CountTokens = Callable[[list[str]], list[int]]


@dataclass
class Loaded:
    """A data file as curation sees it: the usable rows (with their original fields, for writing
    back) and, per reason, the rows the loader could not use ((record index, source, error), in
    file order)."""

    path: Path
    task: str
    fmt: str
    columns: list[str]
    records: list[dict] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    conversations: list[list[list[Message]]] = field(default_factory=list)  # chat: one list per row
    unusable: dict[str, list[tuple[int, str, DroppableRowError]]] = field(default_factory=dict)

    def unusable_sources(self) -> dict[str, list[str]]:
        return {reason: [src for _, src, _ in items] for reason, items in self.unusable.items()}

    def labels(self) -> list[str]:
        return sorted({r.label for r in self.rows if r.label is not None})


def source_of(path: Path, rec: Record) -> str:
    """'file:line' (or 'file#index' for Parquet), as the chat reader writes it."""
    return f"{path}:{rec.line}" if rec.line is not None else f"{path}#{rec.index}"


def detect_task(path: Path, first: Record, text_column: str, label_column: str) -> str:
    """The task a file's first record looks like: classification when the label column is there
    (or the user named the columns), else chat or plain text by the chat reader's key rules.

    A record with a 'text' key and other keys but no label is ambiguous (a classification file
    that lost its labels, or plain text with metadata): we stop and ask rather than guess."""
    keys = set(first.fields)
    if label_column in keys or text_column != "text" or label_column != "label":
        return "classification"
    cols = ", ".join(sorted(keys)) or "none"
    try:
        fmt = detect_chat_format(path, first)
    except InputError:
        raise InputError(f"cannot tell the task from the columns ({cols}): classification needs 'text' and "
                         "'label' (or --text-column/--label-column), chat needs 'messages', 'conversations', "
                         "'instruction'/'output' or 'prompt'/'completion', plain text a 'text' column",
                         file=path, **first.where()) from None
    if fmt != "text":
        return "chat"
    if keys != {"text"}:
        raise InputError(f"missing column (columns present: {cols}); give --label-column for classification, "
                         "or --task text for plain text", file=path, field=label_column, **first.where())
    return "text"


def load_rows(path: str | Path, *, task: str = "auto", text_column: str = "text", label_column: str = "label",
              label_names: list[str] | None = None) -> Loaded:
    """Read a file into curation rows. `label_names` (the training file's) makes an eval file's
    unknown label an error, as in training."""
    path = Path(path)
    if task not in TASKS:
        raise InputError(f"unknown task '{task}'; use one of {list(TASKS)}", field="--task")
    if path.suffix.lower() == ".txt":
        if task != "text":
            raise InputError("a .txt suffix means plain text: say --task text to read it so "
                             "(classification and chat data are csv/tsv/jsonl/json/parquet)", file=path)
        return _load_txt(path)
    records = read_records(path)
    if task == "auto":
        task = detect_task(path, records[0], text_column, label_column)
    fmt = output_format(path, "FILE")
    loaded = Loaded(path, task, fmt, columns=list(records[0].fields))
    if task == "classification":
        _load_classification(loaded, records, text_column, label_column, label_names)
    else:
        _load_chat(loaded, records)
    return loaded


def _usable(loaded: Loaded, records: list[Record], parse: Callable[[Record], object]):
    """(record, parse(record)) for each record, in order; a record whose parse raises
    DroppableRowError is counted in `loaded.unusable` and skipped."""
    for rec in records:
        try:
            parsed = parse(rec)
        except DroppableRowError as err:
            loaded.unusable.setdefault(err.reason, []).append((rec.index, source_of(loaded.path, rec), err))
            continue
        yield rec, parsed


def _load_classification(loaded: Loaded, records: list[Record], text_column: str, label_column: str,
                         label_names: list[str] | None) -> None:
    path, kept, raw = loaded.path, [], []
    for rec, text in _usable(loaded, records, lambda rec: record_text(rec, path, text_column)):
        value = record_label(rec, path, label_column)
        if label_names is not None and to_id(value, label_names, False) is None:
            raise InputError(f"label {value!r} does not occur in the training data {label_names}", file=path,
                             field=label_column, **rec.where())
        kept.append(rec)
        raw.append(value)
        loaded.records.append(rec.fields)
        loaded.rows.append(Row(normalize_text(text), text, str(value), source_of(path, rec)))
    if kept and label_names is None:
        check_one_kind(raw, kept, path, label_column)


def _load_chat(loaded: Loaded, records: list[Record]) -> None:
    path = loaded.path
    fmt = detect_chat_format(path, records[0])
    if loaded.task == "text" and fmt != "text":
        raise InputError(f"--task text needs records with a 'text' key; these look like '{fmt}' conversations "
                         "(use --task chat)", file=path, **records[0].where())
    if loaded.task == "chat" and fmt == "text":
        raise InputError("--task chat needs conversations (messages, conversations, instruction/output or "
                         "prompt/completion); these records hold plain 'text' (use --task text)", file=path,
                         **records[0].where())
    for rec, parsed in _usable(loaded, records, lambda rec: parse_record(rec, path, fmt)):
        loaded.records.append(rec.fields)
        source = source_of(path, rec)
        if isinstance(parsed, str):
            loaded.rows.append(Row(normalize_text(parsed), parsed, None, source))
            continue
        loaded.conversations.append(parsed)
        pairs = [[(m.role, m.content) for m in conv] for conv in parsed]
        key = conversation_key(pairs[0]) if len(pairs) == 1 else "\n".join(conversation_key(p) for p in pairs)
        text = "\n".join(m.content for conv in parsed for m in conv)
        loaded.rows.append(Row(key, text, None, source))


def _load_txt(path: Path) -> Loaded:
    data = read_chat_data(path, "text")
    loaded = Loaded(path, "text", "txt", columns=["text"])
    for text, source in zip(data.texts, data.sources):
        loaded.records.append({"text": text})
        loaded.rows.append(Row(normalize_text(text), text, None, source))
    return loaded


def token_counts(loaded: Loaded, count_tokens: CountTokens | None) -> list[int] | None:
    """Tokens per row (of the text; for chat, of the message contents without the template)."""
    return count_tokens([r.text for r in loaded.rows]) if count_tokens is not None and loaded.rows else None


def check_filters(filters: Filters, count_tokens: CountTokens | None) -> None:
    """Bounds are whole numbers >= 0 with min <= max; token bounds need a tokenizer."""
    for low, high, name in ((filters.min_chars, filters.max_chars, "chars"), (filters.min_tokens, filters.max_tokens, "tokens")):
        for value, option in ((low, f"--min-{name}"), (high, f"--max-{name}")):
            if value is not None and value < 0:
                raise InputError(f"must be 0 or more, got {value}", field=option)
        if low is not None and high is not None and low > high:
            raise InputError(f"--min-{name} {low} is above --max-{name} {high}: no row could pass", field=f"--min-{name}")
    if (filters.min_tokens is not None or filters.max_tokens is not None) and count_tokens is None:
        raise InputError("token bounds need a tokenizer (a model folder or embedded name)", field="--tokenizer")
    if filters.near_duplicate is not None and not 0 < filters.near_duplicate <= 1:
        raise InputError(f"a Jaccard similarity in (0, 1] is needed, got {filters.near_duplicate}", field="--near-dup")


def curate_loaded(loaded: Loaded, filters: Filters, count_tokens: CountTokens | None = None,
                  train_keys: set[str] | None = None) -> tuple[Curated, dict]:
    """Run the curation rules over a loaded file: the outcome and its report (counts, examples)."""
    curated = curate(loaded.rows, filters, train_keys=train_keys, token_counts=token_counts(loaded, count_tokens))
    report = describe(curated, loaded.rows, loaded.unusable_sources())
    n_rows = len(loaded.rows) + sum(len(v) for v in loaded.unusable.values())
    return curated, {"file": str(loaded.path), "task": loaded.task, "format": loaded.fmt, "rows": n_rows,
                     "kept": len(curated.kept), **report}


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    return a.exists() and b.exists() and os.path.samefile(a, b)


def refuse_overwrite(outputs: dict[str, Path], inputs: list[Path]) -> None:
    """Exit 2 rather than write over an input file, or write two outputs to one file."""
    seen: dict[Path, str] = {}
    for option, out in outputs.items():
        for inp in inputs:
            if _same_file(out, inp):
                raise InputError("is the input file; write the cleaned rows to a new file (inputs are never "
                                 "overwritten)", file=out, field=option)
        other = next((o for p, o in seen.items() if _same_file(out, p)), None)
        if other:
            raise InputError(f"is also given as {other}; use two different files", file=out, field=option)
        seen[out] = option


def _write(loaded: Loaded, kept: list[int], out: Path, option: str) -> str:
    records = [loaded.records[i] for i in kept]
    if output_format(out, option) == "txt" and loaded.task != "text":
        raise InputError(f"a .txt output holds plain text only, not {loaded.task} data; use .jsonl", file=out,
                         field=option)
    return write_records(out, records, columns=loaded.columns, field=option)


def clean_files(file: str | Path, out: str | Path, *, eval_file: str | Path | None = None,
                eval_out: str | Path | None = None, task: str = "auto", text_column: str = "text",
                label_column: str = "label", filters: Filters = Filters(),
                count_tokens: CountTokens | None = None) -> dict:
    """Clean FILE (and EVAL_FILE) into OUT (and EVAL_OUT); returns the report of both.

    Everything is read and checked before anything is written, so a bad eval file leaves no
    half-done outputs behind."""
    file, out = Path(file), Path(out)
    outputs = {"--out": out}
    if eval_file is not None:
        if eval_out is None:
            raise InputError("--eval needs --eval-out (the file for the cleaned eval rows)", field="--eval-out")
        outputs["--eval-out"] = Path(eval_out)
    elif eval_out is not None:
        raise InputError("--eval-out without --eval: there is no eval file to clean", field="--eval-out")
    refuse_overwrite(outputs, [file] + ([Path(eval_file)] if eval_file is not None else []))
    check_filters(filters, count_tokens)
    for option, path in outputs.items():
        output_format(path, option)
    train = load_rows(file, task=task, text_column=text_column, label_column=label_column)
    curated, report = curate_loaded(train, filters, count_tokens)
    evaluation = None
    if eval_file is not None:
        names = train.labels() if train.task == "classification" else None
        evaluation = load_rows(eval_file, task=train.task, text_column=text_column, label_column=label_column,
                               label_names=names)
        eval_curated, eval_report = curate_loaded(evaluation, filters, count_tokens,
                                                  train_keys={r.key for r in train.rows})
    report["out"], report["out_format"] = str(out), _write(train, curated.kept, out, "--out")
    if evaluation is not None:
        eval_out = Path(eval_out)
        eval_report["out"], eval_report["out_format"] = str(eval_out), _write(evaluation, eval_curated.kept,
                                                                              eval_out, "--eval-out")
        report["eval"] = eval_report
    return report
