"""Writes that survive faults: atomic replace with fsync (file and folder), and disk-full detection.

A file written with `write_atomic` is either the old version or the new one, never half of each,
even across a power cut: the bytes go to a temporary file beside it, are fsync'ed, the file is
renamed over the old one and the parent folder is fsync'ed so the rename itself is on disk.

`is_disk_full` recognises running out of space (ENOSPC) or quota (EDQUOT) however the writing
library reports it: an OSError with the errno, torch's "[enforce fail at inline_container.cc] ...
file write failed", safetensors' "No space left on device".
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_DISK_FULL_WORDS = ("no space left", "disk quota exceeded", "quota exceeded", "file write failed",
                    "enospc", "edquot")


def is_disk_full(e: BaseException) -> bool:
    """Whether an exception from a write means the disk (or the quota) is full."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
            return True
        if any(w in str(e).lower() for w in _DISK_FULL_WORDS):
            return True
        e = e.__cause__ or e.__context__
    return False


# torch's zip writer and safetensors fail a short write in their own words ("unexpected pos 4480 vs
# 4374", "PytorchStreamWriter failed writing file"): any error of theirs while writing is a write failure.
_WRITER_WORDS = ("inline_container", "pytorchstreamwriter", "ioerror", "serializ")


def is_write_error(e: BaseException) -> bool:
    """Whether an exception raised while writing a file means the write itself failed."""
    return isinstance(e, OSError) or is_disk_full(e) or type(e).__name__ == "SafetensorError" or any(
        w in str(e).lower() for w in _WRITER_WORDS)


def space_left(path: Path) -> int | None:
    """Bytes free for us on the file system holding `path` (or its nearest existing parent)."""
    path = Path(path)
    while not path.exists() and path.parent != path:
        path = path.parent
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def looks_full(path: Path, e: BaseException) -> bool:
    """A failed write on a file system with (almost) nothing left: disk full, whatever the words."""
    if is_disk_full(e):
        return True
    free = space_left(path)
    return free is not None and free < 16 * 2**20


def reason(e: BaseException) -> str:
    """A short cause for a failed write: the OS's words when there are some."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    if is_disk_full(e):
        return "No space left on device"
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def fsync_dir(path: Path) -> None:
    """fsync a folder, so that a rename or a new file inside it is durable."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a folder; the rename is still atomic
    finally:
        os.close(fd)


def write_atomic(path: str | Path, data: str | bytes, encoding: str = "utf-8") -> None:
    """Replace `path` with `data` atomically and durably; on any failure the old file stays and no
    temporary file is left behind (the error propagates)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    payload = data.encode(encoding) if isinstance(data, str) else data
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a completely written folder into place (an old one is removed first) and make it durable."""
    import shutil

    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)
