"""Read data files into plain records, each with the line (or index) it came from.

We read CSV/TSV/JSONL/JSON with the standard library rather than `datasets` or pandas because the
point of this stage is the location of every problem: a bad byte, a broken JSON line or a short
CSV row is reported as `file:line`, which neither of those libraries can tell us. Parquet has no
lines, so its records are located by row number.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import InputError

FORMATS_BY_SUFFIX = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".pq": "parquet",
}
MAX_FIELD_CHARS = 10_000_000
# A line this long is a file whose newlines were lost (or a hostile one): refused before any parsing.
# .json files are exempt (a JSON array written without indentation is one long line).
MAX_LINE_CHARS = 4 * MAX_FIELD_CHARS


class _KeyTwice(ValueError):
    """An object holding one key twice (json keeps the last value silently)."""

    def __init__(self, key: str):
        self.key = key
        super().__init__(key)


def _object_once(pairs: list[tuple[str, Any]]) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        raise _KeyTwice(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return obj


# every JSON object of a data file read with this: a key given twice is an error at its line, not the last value
_DECODER = json.JSONDecoder(object_pairs_hook=_object_once)


def _key_twice(e: _KeyTwice, path: Path, **where) -> InputError:
    return InputError(f"key '{e.key}' appears twice in one object (JSON would keep the last value silently)",
                      file=path, field=e.key, **where)


class DroppableRowError(InputError):
    """A row that training refuses but curation may simply drop (an empty text, a conversation
    with nothing to learn). It is an InputError, so `train` and `data check` still stop at it with
    exit 2; `data clean` catches it per row and counts the row under `reason` instead."""

    def __init__(self, message: str, *, reason: str, **where):
        self.reason = reason
        super().__init__(message, **where)


@dataclass(frozen=True)
class Record:
    """One row of a data file: its fields, and where it is (line for text formats, else index)."""

    fields: dict[str, Any]
    index: int
    line: int | None

    def where(self) -> dict:
        """Keyword arguments for InputError that locate this record."""
        if self.line is not None:
            return {"line": self.line}
        return {"where": f"record {self.index}"}


def detect_format(path: Path, declared: str = "auto") -> str:
    if declared != "auto":
        return declared
    fmt = FORMATS_BY_SUFFIX.get(path.suffix.lower())
    if fmt is None:
        raise InputError(
            f"cannot tell the format from the suffix '{path.suffix}'; "
            f"use one of {sorted(FORMATS_BY_SUFFIX)} or set data.format",
            file=path,
        )
    return fmt


def check_data_file(path: str | Path, what: str = "data file") -> Path:
    """A regular file we may read, or InputError: missing, a folder, a symlink loop, or something that
    is not a file (a FIFO or a device would block the read forever, or never end)."""
    path = Path(path)
    try:
        st = os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise InputError("symbolic link loop (the link points back at itself)", file=path) from None
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            raise InputError(f"{what} not found", file=path) from None
        raise InputError(f"cannot read the {what} ({e.strerror})", file=path) from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"expected a {what}, found a folder", file=path)
    if not stat.S_ISREG(st.st_mode):
        kind = "a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else (
            "a socket" if stat.S_ISSOCK(st.st_mode) else "a device")
        raise InputError(f"is {kind}, not a regular file; give a file", file=path)
    if not os.access(path, os.R_OK):
        raise InputError(f"cannot read the {what} (permission denied)", file=path)
    return path


def read_records(path: str | Path, fmt: str = "auto", *, header: bool | None = True,
                 columns: list[str] | None = None) -> list[Record]:
    """Read every record of a data file; raise InputError at the first thing that is not data.

    CSV/TSV only: `header` False reads a file without a header row, its fields named `columns` in
    order; None detects it (see `_has_header`). Other formats ignore both. A Hugging Face dataset
    (a save_to_disk folder, or hf:ORG/NAME[:CONFIG][@SPLIT]) gives its rows (data.hf).
    """
    from tunelab.data.hf import is_hf_source, read_hf_records

    if is_hf_source(path):
        return read_hf_records(path)
    path = check_data_file(path)
    fmt = detect_format(path, fmt)
    if fmt == "parquet":
        records = _read_parquet(path)
    else:
        text = _read_text(path)
        if fmt != "json":
            check_line_lengths(path, text)
        if fmt == "jsonl":
            records = _read_jsonl(path, text)
        elif fmt == "json":
            records = _read_json(path, text)
        else:
            records = _read_delimited(path, text, "\t" if fmt == "tsv" else ",", header, columns)
    if not records:
        raise InputError("no records in the file (it holds only a header or blank lines)", file=path)
    return records


_UTF16_32_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"),
                  (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16"))


def _lines(text: str) -> list[str]:
    """Lines split at '\n' only: str.splitlines() also splits at U+2028, \x0c, \x1c... which JSON
    strings and CSV fields may hold, and that would break records and shift every line number."""
    return io.StringIO(text, newline="\n").readlines()


def check_line_lengths(path: Path, text: str, limit: int = MAX_LINE_CHARS, first_line: int = 1) -> None:
    """Refuse a line longer than `limit` characters (linear time), naming its line (`first_line`: the
    file's line number of the text's first line, for a chunk of a file)."""
    lengths = list(map(len, text.split("\n")))
    if max(lengths, default=0) > limit:
        i = next(i for i, n in enumerate(lengths) if n > limit)
        raise InputError(f"line has {lengths[i]:,} characters, more than the limit of {limit:,} "
                         "(newlines lost, or not a line-based file?)", file=path, line=first_line + i)


def decode_text(path: Path, raw: bytes, first_line: int = 1) -> str:
    """A file's bytes (or a chunk of whole lines of it starting at `first_line`) as text: refused,
    at their line, when they are UTF-16/32 (a BOM at the file's start), hold a NUL byte or are not
    UTF-8; the file's own UTF-8 BOM is dropped."""
    if first_line == 1:
        for bom, name in _UTF16_32_BOMS:  # Excel's "Unicode text" export: NUL bytes, but not binary
            if raw.startswith(bom):
                raise InputError(f"file is {name} text; re-save it as UTF-8", file=path)
    nul = raw.find(b"\x00")
    if nul >= 0:  # anywhere in the file, not only its first block: a NUL is never text
        raise InputError("holds a NUL byte (a binary file, or a corrupt one), not text data", file=path,
                         line=first_line + raw.count(b"\n", 0, nul))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + raw.count(b"\n", 0, e.start)
        raise InputError(f"not valid UTF-8 (byte 0x{raw[e.start]:02x}); re-save the file as UTF-8", file=path, line=line) from None
    return text.removeprefix("\ufeff") if first_line == 1 else text


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    if not raw.strip():
        raise InputError("file is empty", file=path)
    return decode_text(path, raw)


def _read_jsonl(path: Path, text: str, first_line: int = 1, first_index: int = 0) -> list[Record]:
    """The records of JSONL text; `first_line`/`first_index`: where the text starts in its file (data.stream)."""
    records = []
    for lineno, line in enumerate(_lines(text), start=first_line):
        if not line.strip():
            continue
        try:
            obj = _DECODER.decode(line)
        except json.JSONDecodeError as e:
            raise InputError(f"invalid JSON ({e.msg}, column {e.colno})", file=path, line=lineno) from None
        except _KeyTwice as e:
            raise _key_twice(e, path, line=lineno) from None
        except (RecursionError, ValueError) as e:
            raise InputError(f"invalid JSON ({_json_limit(e)})", file=path, line=lineno) from None
        if not isinstance(obj, dict):
            raise InputError(f"each line must be a JSON object, got {type(obj).__name__}", file=path, line=lineno)
        if "\\u" in line:
            _no_surrogates(obj, path, lineno)
        records.append(Record(obj, first_index + len(records), lineno))
    return records


def _read_json(path: Path, text: str) -> list[Record]:
    """A JSON array of objects, decoded element by element so each record keeps its line."""
    decoder = _DECODER
    pos = _skip_ws(text, 0)
    if pos >= len(text) or text[pos] != "[":
        try:
            obj = _DECODER.decode(text)
        except json.JSONDecodeError as e:
            raise InputError(f"invalid JSON ({e.msg})", file=path, line=e.lineno) from None
        except _KeyTwice as e:
            raise _key_twice(e, path, line=1) from None
        except (RecursionError, ValueError) as e:
            raise InputError(f"invalid JSON ({_json_limit(e)})", file=path, line=1) from None
        if isinstance(obj, dict) and isinstance(obj.get("data"), list):
            return [Record(r, i, None) for i, r in enumerate(_objects(path, obj["data"]))]
        raise InputError("a .json data file must hold a list of objects (or use .jsonl)", file=path, line=1)
    records = []
    pos = _skip_ws(text, pos + 1)
    while pos < len(text) and text[pos] != "]":
        line = text.count("\n", 0, pos) + 1
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise InputError(f"invalid JSON ({e.msg})", file=path, line=e.lineno) from None
        except _KeyTwice as e:
            raise _key_twice(e, path, line=line) from None
        except (RecursionError, ValueError) as e:
            raise InputError(f"invalid JSON ({_json_limit(e)})", file=path, line=line) from None
        if not isinstance(obj, dict):
            raise InputError(f"record {len(records)} is {type(obj).__name__}, expected an object", file=path, line=line)
        _no_surrogates(obj, path, line)
        records.append(Record(obj, len(records), line))
        pos = _skip_ws(text, pos)
        if pos < len(text) and text[pos] == ",":
            comma = pos
            pos = _skip_ws(text, pos + 1)
            if pos < len(text) and text[pos] == "]":
                raise InputError("invalid JSON (a trailing comma before ']'); remove it", file=path,
                                 line=text.count("\n", 0, comma) + 1)
        elif pos < len(text) and text[pos] != "]":
            raise InputError("invalid JSON (expected ',' or ']')", file=path, line=text.count("\n", 0, pos) + 1)
    if pos >= len(text):
        raise InputError("invalid JSON (the list is not closed: file truncated?)", file=path, line=text.count("\n") + 1)
    if text[pos + 1 :].strip():
        raise InputError("invalid JSON (extra data after the list)", file=path, line=text.count("\n", 0, pos) + 1)
    return records


def _no_surrogates(value: Any, path: Path, line: int | None, where: str | None = None) -> None:
    """JSON's \\ud800-style escapes can encode half a character (a lone surrogate): no tokenizer or
    UTF-8 writer takes it, so it is refused here, at its line."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:
                raise InputError(f"text holds a lone surrogate (U+{ord(v[e.start]):04X}, half of a character: a "
                                 "broken \\u escape); fix or drop it", file=path, line=line, where=where) from None
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)


def _json_limit(e: Exception) -> str:
    """What a JSON value broke that is not syntax: nesting beyond Python's recursion limit, or an
    integer beyond its digit limit."""
    if isinstance(e, RecursionError):
        return "nested too deeply"
    return str(e).split(";")[0]


def _objects(path: Path, items: list) -> list[dict]:
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise InputError(f"expected an object, got {type(item).__name__}", file=path, where=f"record {i}")
        _no_surrogates(item, path, None, f"record {i}")
    return items


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _has_header(first: list[str], rest: list[list[str]], columns: list[str] | None) -> bool:
    """Header detection (data.header: auto). The first row is read as data only when all of these
    hold: it names none of the expected `columns`, it has exactly as many fields, and its last field
    (the label, in a headerless file) occurs again in that place in the rows after it, as a label
    does (AG News' `text<TAB>label-name` rows). A header with other names ("review, sentiment") fails
    the last test and stays a header, so its missing-column error says what to set."""
    if not columns:
        return True
    if {f.strip() for f in first} & set(columns) or len(first) != len(columns):
        return True
    label = first[-1].strip()
    return not any(len(r) == len(first) and r[-1].strip() == label for r in rest)


def _read_delimited(path: Path, text: str, delimiter: str, has_header: bool | None = True,
                    columns: list[str] | None = None) -> list[Record]:
    csv.field_size_limit(MAX_FIELD_CHARS)
    lines = _lines(text)
    # TSV files (SST-2 among them) use no quoting: a lone `"` inside a sentence is a character.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(lines, delimiter=delimiter, quoting=quoting, strict=True)
    try:
        header = next(reader)
    except StopIteration:
        raise InputError("file is empty", file=path) from None
    except csv.Error as e:
        raise InputError(f"unreadable {'header' if has_header else 'first row'} ({e})", file=path, line=1) from None
    if has_header is None:
        sample = csv.reader(lines[1:1001], delimiter=delimiter, quoting=quoting)
        try:
            rest = list(sample)
        except csv.Error:  # a malformed row: the reading below names its line
            rest = []
        has_header = _has_header(header, rest, columns)
    if not has_header:  # the first row is data: read again from line 1, fields named by `columns`
        if not columns:
            raise InputError("a file without a header needs its column names", file=path, field="data.header")
        if len(header) != len(columns):
            raise InputError(f"first row has {len(header)} fields; without a header they are read as "
                             f"{', '.join(columns)} ({len(columns)})", file=path, line=1, field="data.header")
        reader = csv.reader(lines, delimiter=delimiter, quoting=quoting, strict=True)
        header = list(columns)
    header = [h.strip() for h in header]
    if len(set(header)) != len(header):
        dup = next(h for h in header if header.count(h) > 1)
        raise InputError(f"column '{dup}' appears twice in the header", file=path, line=1, field=dup)
    records = []
    while True:
        lineno = reader.line_num + 1  # where the row starts; a quoted field may span lines
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            why = "a quote opened in this row is never closed" if "unexpected end of data" in str(e) else str(e)
            raise InputError(f"malformed row ({why})", file=path, line=lineno) from None
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if len(row) != len(header):
            raise InputError(
                f"row has {len(row)} fields, the header has {len(header)} "
                f"(a stray {'tab' if delimiter == chr(9) else 'comma'} or a missing quote?)",
                file=path,
                line=lineno,
            )
        records.append(Record(dict(zip(header, row)), len(records), lineno))
    return records


def _read_parquet(path: Path) -> list[Record]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise InputError(f"not a readable Parquet file ({type(e).__name__}: {e})", file=path) from None
    rows = table.to_pylist()
    return [Record(r, i, None) for i, r in enumerate(rows)]
