"""Write records back to a data file, atomically, in the format its suffix names.

The counterpart of readers.py for `data clean`: rows go out as they came in (every column, in the
input's column order), so a cleaned file reads back exactly like the original minus dropped rows.
A file is written to a temporary name beside the target and renamed over it, so an interrupted
write never leaves a half file under the final name.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from tunelab.data.readers import FORMATS_BY_SUFFIX
from tunelab.errors import InputError

WRITE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt")


def output_format(path: Path, field: str) -> str:
    """The format an output path asks for, by suffix; `field` names the option in errors."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return "txt"
    fmt = FORMATS_BY_SUFFIX.get(suffix)
    if fmt is None:
        raise InputError(f"cannot tell the output format from the suffix '{path.suffix}'; use one of {list(WRITE_SUFFIXES)}",
                         file=path, field=field)
    return fmt


def write_records(path: str | Path, records: list[dict], *, columns: list[str], field: str = "--out") -> str:
    """Write `records` to `path` in the format of its suffix; returns that format.

    `columns` is the header for CSV/TSV (the input's columns, so an empty result keeps them).
    A `.txt` output takes records with one 'text' key: documents separated by blank lines.
    """
    path = Path(path)
    fmt = output_format(path, field)
    if fmt == "parquet":
        _atomic(path, lambda tmp: _write_parquet(tmp, records))
        return fmt
    if fmt == "jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records)
    elif fmt == "json":  # one record per line, so the reader can still name each record's line
        text = "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False, default=str) for r in records) + "\n]\n"
    elif fmt == "txt":
        text = _txt(path, records, field)
    else:
        text = _delimited(path, records, columns, fmt, field)
    _atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8", newline=""))
    return fmt


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _cell(value: Any, path: Path, field: str, column: str, fmt: str) -> str:
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        raise InputError(f"column '{column}' holds {type(value).__name__} values, which a {fmt.upper()} file cannot "
                         "hold; write a .jsonl file instead", file=path, field=field)
    text = str(value)
    if fmt == "tsv" and any(c in text for c in "\t\n\r"):
        raise InputError(f"a value of column '{column}' holds a tab or line break, which a TSV file (no quoting) "
                         "cannot hold; write a .csv or .jsonl file instead", file=path, field=field)
    return text


def _delimited(path: Path, records: list[dict], columns: list[str], fmt: str, field: str) -> str:
    header = list(columns)
    for r in records:
        header += [k for k in r if k not in header]
    rows = [[_cell(r.get(c), path, field, c, fmt) for c in header] for r in records]
    if fmt == "tsv":  # our TSV reader uses no quoting: fields are written bare, tab-joined
        return "".join("\t".join(row) + "\n" for row in [header, *rows])
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def _txt(path: Path, records: list[dict], field: str) -> str:
    texts = []
    for r in records:
        text = r.get("text")
        if set(r) != {"text"} or not isinstance(text, str):
            raise InputError("a .txt output holds plain text only (records with a single 'text' string); "
                             "write a .jsonl file instead", file=path, field=field)
        if any(not line.strip() for line in text.split("\n")):
            raise InputError("a text holds a blank line, which would split it into two documents in a .txt file; "
                             "write a .jsonl file instead", file=path, field=field)
        texts.append(text)
    return "\n\n".join(texts) + "\n" if texts else ""


def _write_parquet(tmp: Path, records: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), tmp)
