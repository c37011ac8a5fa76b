"""Reading a JSONL file in chunks of records, so a file larger than memory can be checked and
encoded: each chunk is decoded and validated exactly as the whole-file reader does (BOM, NUL,
UTF-8, line length, JSON, lone surrogates), and every error names the file's own line number.

Only JSONL streams (it is the format large SFT sets come in, and one line is one record); other
formats are read whole by data.readers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from tunelab.data.readers import _UTF16_32_BOMS, MAX_LINE_CHARS, Record, _read_jsonl, check_data_file, detect_format
from tunelab.errors import InputError

STREAM_ROWS = 10_000  # records per chunk: bounds the memory of the first pass


def streams(path, fmt: str = "auto") -> bool:
    """Whether `path` is read in chunks (a JSONL file)."""
    try:
        return Path(path).is_file() and detect_format(Path(path), fmt if fmt in ("jsonl",) else "auto") == "jsonl"
    except InputError:
        return False


def _decode(path: Path, raw: bytes, first_line: int, first: bool) -> str:
    if first:
        for bom, name in _UTF16_32_BOMS:
            if raw.startswith(bom):
                raise InputError(f"file is {name} text; re-save it as UTF-8", file=path)
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise InputError("holds a NUL byte (a binary file, or a corrupt one), not text data", file=path,
                         line=first_line + raw.count(b"\n", 0, nul))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"not valid UTF-8 (byte 0x{raw[e.start]:02x}); re-save the file as UTF-8", file=path,
                         line=first_line + raw.count(b"\n", 0, e.start)) from None
    for i, line in enumerate(text.split("\n")):
        if len(line) > MAX_LINE_CHARS:
            raise InputError(f"line has {len(line):,} characters, more than the limit of {MAX_LINE_CHARS:,} "
                             "(newlines lost, or not a line-based file?)", file=path, line=first_line + i)
    return text.removeprefix("\ufeff") if first else text


def iter_jsonl_chunks(path, rows: int | None = None) -> Iterator[list[Record]]:
    """The records of a JSONL file, `rows` lines at a time (blank lines skipped, as the reader does)."""
    path = check_data_file(path)
    rows = rows or STREAM_ROWS
    line_no, index, first, seen = 1, 0, True, False
    buf: list[bytes] = []
    with open(path, "rb") as f:
        while True:
            raw = f.readline()
            if raw:
                buf.append(raw)
            if buf and (len(buf) >= rows or not raw):
                records = _read_jsonl(path, _decode(path, b"".join(buf), line_no, first), line_no, index)
                line_no, first = line_no + len(buf), False
                buf = []
                if records:
                    seen, index = True, index + len(records)
                    yield records
            if not raw:
                break
    if not seen:
        raise InputError("file is empty", file=path)


__all__ = ["iter_jsonl_chunks", "streams", "STREAM_ROWS"]
