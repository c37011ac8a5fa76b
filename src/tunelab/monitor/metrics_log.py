"""metrics.jsonl: one JSON object per logged step or evaluation, each row one append.

A row is written with a single `write` on an O_APPEND descriptor, so a kill leaves whole rows; a
disk that fills mid-row (or a power cut) can still leave a torn last line: a failed write cuts the
file back to where the row began, and `repair_metrics` (run on resume) cuts a torn last line left by
anything else, and says so. A damaged line in the middle is an input error naming its line.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from tunelab.errors import InputError


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN; keep it visible instead of breaking readers
    return value


class MetricsLog:
    def __init__(self, path: Path):
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, row: dict) -> None:
        """Append one row; on failure (disk full) the file is cut back to the rows before it and the
        OSError propagates."""
        data = (json.dumps({k: _clean(v) for k, v in row.items()}) + "\n").encode("utf-8")
        start = os.fstat(self._fd).st_size
        try:
            written = os.write(self._fd, data)
            if written != len(data):  # a short write is what a full disk gives before ENOSPC
                raise OSError(28, "No space left on device (short write)")
        except OSError:
            try:
                os.ftruncate(self._fd, start)
            except OSError:
                pass  # repair_metrics cuts it on resume
            raise

    def sync(self) -> None:
        """fsync: the rows so far survive a power cut (called with every checkpoint)."""
        if self._fd is not None:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _parse(path: Path) -> tuple[list[dict], int | None, bool]:
    """The rows; the byte offset of a torn last line (None when there is none); whether the file
    lacks its final newline after a whole last row."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    n_real = max((i for i, line in enumerate(lines, start=1) if line.strip()), default=0)  # the last non-blank line
    rows, pos = [], 0
    for i, line in enumerate(lines, start=1):
        if line.strip():
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("not an object")
            except ValueError:
                if i >= n_real:  # the last line: an append cut short
                    return rows, pos, False
                raise InputError("metrics.jsonl has a damaged line (not a JSON object); delete the line, or the "
                                 "run dir", file=path, line=i) from None
            rows.append(row)
        pos += len(line) + 1
    return rows, None, bool(data) and not data.endswith(b"\n")


def read_metrics(path: Path) -> list[dict]:
    """Every whole row (a torn last line is left out; `repair_metrics` cuts it from the file)."""
    if not path.is_file():
        return []
    return _parse(path)[0]


def repair_metrics(path: Path) -> str | None:
    """Cut a torn last line (an interrupted append) from metrics.jsonl; return what was done."""
    if not path.is_file():
        return None
    rows, torn, no_newline = _parse(path)
    if torn is None and not no_newline:
        return None
    size = path.stat().st_size
    with open(path, "r+b") as f:
        if torn is not None:
            f.truncate(torn)
        else:
            f.seek(0, os.SEEK_END)
            f.write(b"\n")
        f.flush()
        os.fsync(f.fileno())
    if torn is None:
        return f"{path}: the last row lacked its newline (an interrupted write); added it"
    return f"{path}: cut a torn last line ({size - torn} bytes, an interrupted write); {len(rows)} rows kept"
