"""Reading a JSONL file in chunks of records, so a file larger than memory can be checked and
encoded: each chunk is decoded and validated exactly as the whole-file reader does (BOM, NUL,
UTF-8, line length, JSON, lone surrogates), and every error names the file's own line number.

Only JSONL streams (it is the format large SFT sets come in, and one line is one record); other
formats are read whole by data.readers (`record_chunks` gives either as chunks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from tunelab.data.readers import Record, _read_jsonl, check_data_file, check_line_lengths, decode_text, detect_format
from tunelab.errors import InputError

STREAM_ROWS = 10_000  # records per chunk: bounds the memory of the first pass
FILE_FORMATS = ("csv", "tsv", "jsonl", "json", "parquet")  # data.format values that name a file format


def streams(path, fmt: str = "auto") -> bool:
    """Whether `path` is read in chunks (a JSONL file, unless data.format names another file format)."""
    if fmt in FILE_FORMATS and fmt != "jsonl":
        return False
    try:
        return Path(path).is_file() and detect_format(Path(path), fmt if fmt in ("jsonl",) else "auto") == "jsonl"
    except InputError:
        return False


def _decode(path: Path, raw: bytes, first_line: int) -> str:
    text = decode_text(path, raw, first_line)
    check_line_lengths(path, text, first_line=first_line)
    return text


def record_chunks(path, fmt: str = "auto", *, header: bool | None = True, columns: list[str] | None = None,
                  rows: int | None = None) -> Iterator[list[Record]]:
    """The records of any data input in chunks: a JSONL file `rows` records at a time (bounded memory),
    everything else (CSV/TSV/JSON/Parquet, datasets) as one chunk of data.readers.read_records."""
    if streams(path, fmt):
        yield from iter_jsonl_chunks(path, rows)
    else:
        from tunelab.data.readers import read_records

        yield read_records(path, fmt if fmt in FILE_FORMATS else "auto", header=header, columns=columns)


def iter_jsonl_chunks(path, rows: int | None = None) -> Iterator[list[Record]]:
    """The records of a JSONL file, `rows` lines at a time (blank lines skipped, as the reader does)."""
    path = check_data_file(path)
    rows = rows or STREAM_ROWS
    line_no, index, seen = 1, 0, False
    buf: list[bytes] = []
    with open(path, "rb") as f:
        while True:
            raw = f.readline()
            if raw:
                buf.append(raw)
            if buf and (len(buf) >= rows or not raw):
                records = _read_jsonl(path, _decode(path, b"".join(buf), line_no), line_no, index)
                line_no += len(buf)
                buf = []
                if records:
                    seen, index = True, index + len(records)
                    yield records
            if not raw:
                break
    if not seen:
        raise InputError("file is empty", file=path)


__all__ = ["iter_jsonl_chunks", "record_chunks", "streams", "STREAM_ROWS"]
