"""The one error type for bad input, and how it is worded.

Every problem the user can fix (a config value, a data row, a model path) is raised as
`InputError`; the CLI turns it into one line on stderr and exit code 2, without a traceback.
Anything else is a bug of ours and exits 1.
"""

from __future__ import annotations

from pathlib import Path


class InputError(Exception):
    """A problem in the user's input, located as precisely as we can: file, line, field."""

    def __init__(
        self,
        message: str,
        *,
        file: str | Path | None = None,
        line: int | None = None,
        field: str | None = None,
        where: str | None = None,
    ):
        self.message = message
        self.file = str(file) if file is not None else None
        self.line = line
        self.field = field
        self.where = where  # a location that is not a line: "record 12", "row 40"
        super().__init__(self.one_line())

    def one_line(self) -> str:
        parts = []
        if self.file:
            loc = self.file
            if self.line is not None:
                loc += f":{self.line}"
            parts.append(loc)
        if self.where:
            parts.append(self.where)
        if self.field:
            parts.append(f"field '{self.field}'")
        text = " ".join(self.message.split())  # one line, whatever the message held
        return (": ".join(parts) + ": " if parts else "") + text


class RunFailure(Exception):
    """A run that cannot go on for a reason outside our code and outside the config (disk full,
    out of memory): one clear line saying what is safe and what to do; exit code 1."""


class OutOfMemory(RunFailure):
    """Training ran out of memory at the current micro-batch size."""


class DiskFull(RunFailure):
    """A write failed for lack of space or quota (or an I/O error): the line names what is intact and
    how to resume."""
