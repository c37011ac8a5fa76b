"""Tokenize once: encoded training and eval data kept on disk, keyed by everything that changes it.

A run, its resume, `tunelab plan` and every rank of a multi-process run encode the same files with
the same tokenizer: the first one writes the result here and the others read it back.

Storage: numpy memmaps (flat little-endian arrays plus a JSON manifest), not Arrow. Encoded rows
are ragged integer lists, and what reads them needs random access by row and all lengths at once
(epoch order, length grouping and packing are computed from lengths alone). A flat int32 array of
tokens with an int64 offsets array gives both with no copy (`lengths = diff(offsets)`, row i =
`values[off[i]:off[i+1]]`), is appended to chunk by chunk while encoding without knowing the row
count up front, and needs only numpy to read: opening an entry costs no `datasets`/pyarrow import
(about a second) and a row read no Arrow ListArray -> Python conversion.

Layout under `data_cache_root()` ($TUNELAB_DATA_CACHE, else $TUNELAB_CACHE/encoded, else
~/.cache/tunelab/encoded): one folder per key (a sha256 over the fingerprint parts) holding the
arrays and `manifest.json` (format, key, the parts, rows, each file's bytes and sha256, the
encoder's statistics). An entry is built in a `.tmp-*` folder, the manifest written last, then the
folder renamed into place, so a killed build never leaves a folder that looks complete. Builders of
the same key take an exclusive file lock, so concurrent ranks encode once and the others wait, then
read; a reader of a finished entry takes the lock shared (readers never wait for each other).

What a hit checks, and so what damage is caught: the checksums are taken once, while the entry is
written; a hit does not read the data again (a 1M-row entry is gigabytes, read on every run, rank
and resume). It checks, in O(files): the manifest is there, parses, and is of this format and key;
every file it names exists with the size it records; the offsets array starts at 0 and ends at the
manifest's token count. A build that did not finish, a deleted, truncated or extended file, a
damaged or foreign manifest are therefore caught on every hit, and the entry is moved aside,
deleted and rebuilt: never used. Bytes changed in place at the same size (a bit flip on disk) are
caught only by the full check, which compares every file's sha256 with the manifest: asked with
`verify=True`, $TUNELAB_DATA_CACHE_VERIFY=1, or `tunelab cache ls --verify`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np

log = logging.getLogger("tunelab")

FORMAT = 1
MANIFEST = "manifest.json"
# the modules whose code shapes an entry's rows, relative to the tunelab package (the tasks' encoders, data/stream.py's
# chunked reader and data/curate.py's text keys too: a file is read here, nothing is imported)
_CODE_MODULES = tuple(f"data/{m}" for m in ("readers.py", "chat.py", "chat_template.py", "classification.py",
                                            "cache.py", "encoded.py", "preference.py", "hf.py", "parallel.py",
                                            "stream.py", "curate.py")) + tuple(
    f"tasks/{m}" for m in ("lm_data.py", "classification_data.py", "preference_data.py"))


def data_cache_root() -> Path:
    """Where encoded data lives: $TUNELAB_DATA_CACHE, else <$TUNELAB_CACHE or ~/.cache/tunelab>/encoded."""
    own = os.environ.get("TUNELAB_DATA_CACHE")
    if own:
        return Path(own).expanduser()
    from tunelab.models.gguf import cache_root

    return cache_root() / "encoded"


# ----------------------------------------------------------------------------------- fingerprint


def _sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_stamp(path: str | Path) -> dict:
    """A data file's identity: resolved path, size, mtime and a sha256 of its content (a file edited
    in place within the mtime resolution, or copied with its mtime kept, still changes the key). A
    missing or unreadable file is the reader's InputError (data.readers.check_data_file), not an OSError."""
    from tunelab.data.hf import hf_stamp, is_hf_source
    from tunelab.data.readers import check_data_file

    if is_hf_source(path):
        return hf_stamp(path)
    p = check_data_file(path).resolve()
    st = p.stat()
    return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": _sha256_file(p)}


def tokenizer_stamp(tokenizer) -> str:
    """A hash of what makes a tokenizer encode as it does: its serialized fast tokenizer (vocabulary,
    merges, normalizer, pre/post-processors, added tokens), chat template, special tokens, padding
    and truncation sides and its class. The folder it was loaded from is left out: a copied model
    folder encodes the same; so is the truncation / padding state the last call left on the fast
    tokenizer's backend (a call with truncation=True, max_length=n sets it: the same tokenizer
    would otherwise change its key by being used)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    serialized = json.loads(backend.to_str()) if backend is not None else None
    if serialized is not None:  # the truncation / padding of the last call, set on the backend by each call: not identity
        serialized.pop("truncation", None)
        serialized.pop("padding", None)
    parts = {
        "class": type(tokenizer).__name__,
        "backend": serialized,
        "vocab": None if backend is not None else sorted(tokenizer.get_vocab().items()),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "special": getattr(tokenizer, "special_tokens_map", {}),
        "sides": [getattr(tokenizer, "padding_side", None), getattr(tokenizer, "truncation_side", None)],
        "flags": {k: getattr(tokenizer, k, None) for k in ("add_bos_token", "add_eos_token", "clean_up_tokenization_spaces")},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def code_stamp() -> str:
    """The tunelab version and a hash of the modules that read and encode data: a change to the
    encoding code changes the key even where the version number was not raised."""
    from tunelab import __version__

    here = Path(__file__).parent.parent
    h = hashlib.sha256(f"{__version__}:{FORMAT}".encode())
    for name in _CODE_MODULES:
        if (here / name).is_file():
            h.update((here / name).read_bytes())
    return h.hexdigest()


def entry_key(parts: dict) -> str:
    """The key of an entry: sha256 over the canonical JSON of every part (plus the code stamp)."""
    blob = json.dumps({**parts, "code": code_stamp()}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


# ----------------------------------------------------------------------------------- writing


class StoreWriter:
    """Appends rows chunk by chunk to one entry's files: ragged int columns sharing one offsets
    array, per-row int columns, and string columns (UTF-8 bytes + their own offsets). With no
    `folder` the arrays are kept in memory instead (data.cache: false), for `in_memory()`."""

    def __init__(self, folder: Path | None, ragged: dict[str, str], columns: dict[str, str],
                 strings: tuple[str, ...] = ()):
        self.folder, self.ragged, self.columns, self.strings = folder, ragged, columns, strings
        self.rows, self._tokens, self._chars = 0, 0, {s: 0 for s in strings}
        self._files: dict[str, tuple] = {}
        self._kept: dict[str, list[np.ndarray]] = {}
        names = ["offsets.i8", *(f"{c}.{d}" for c, d in ragged.items()), *(f"{c}.{d}" for c, d in columns.items()),
                 *(f"{s}.utf8" for s in strings), *(f"{s}.offsets.i8" for s in strings)]
        for name in names:
            if folder is None:
                self._kept[name] = []
            else:
                self._files[name] = (open(folder / name, "wb"), hashlib.sha256(), [0])
        self._write("offsets.i8", np.zeros(1, dtype="<i8"))
        for s in strings:
            self._write(f"{s}.offsets.i8", np.zeros(1, dtype="<i8"))

    def _write(self, name: str, arr: np.ndarray) -> None:
        if self.folder is None:
            self._kept[name].append(np.array(arr, dtype=_dtype(name.rsplit(".", 1)[1].replace("utf8", "u1"))))
            return
        f, h, size = self._files[name]
        data = np.ascontiguousarray(arr).tobytes()
        f.write(data)
        h.update(data)
        size[0] += len(data)

    def add(self, chunk: dict[str, list]) -> None:
        """One chunk of rows: `chunk[c]` a list of int lists (ragged), ints (columns) or strs (strings)."""
        first = next(iter(self.ragged))
        n = len(chunk[first])
        lengths = np.fromiter((len(r) for r in chunk[first]), dtype="<i8", count=n)
        for c, dtype in self.ragged.items():
            rows = chunk[c]
            if any(len(a) != len(b) for a, b in zip(rows, chunk[first])):
                raise ValueError(f"ragged column {c} is not aligned with {first}")
            flat = np.fromiter((t for r in rows for t in r), dtype=_dtype(dtype), count=int(lengths.sum()))
            self._write(f"{c}.{dtype}", flat)
        self._write("offsets.i8", self._tokens + np.cumsum(lengths))
        self._tokens += int(lengths.sum())
        for c, dtype in self.columns.items():
            self._write(f"{c}.{dtype}", np.asarray(chunk[c], dtype=_dtype(dtype)))
        for s in self.strings:
            encoded = [x.encode("utf-8") for x in chunk[s]]
            self._write(f"{s}.utf8", np.frombuffer(b"".join(encoded), dtype=np.uint8))
            ends = self._chars[s] + np.cumsum([len(b) for b in encoded], dtype="<i8")
            self._write(f"{s}.offsets.i8", ends)
            self._chars[s] = int(ends[-1]) if len(ends) else self._chars[s]
        self.rows += n

    def finish(self, key: str, parts: dict, meta: dict) -> dict:
        """Close the files (fsynced) and write the manifest, last."""
        files = {}
        for name, (f, h, size) in self._files.items():
            f.flush()
            os.fsync(f.fileno())
            f.close()
            files[name] = {"bytes": size[0], "sha256": h.hexdigest()}
        manifest = {"format": FORMAT, "key": key, "rows": self.rows, "tokens": self._tokens, "parts": parts,
                    "ragged": self.ragged, "columns": self.columns, "strings": list(self.strings), "files": files,
                    "meta": meta, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        tmp = self.folder / (MANIFEST + ".part")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(manifest, f, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, self.folder / MANIFEST)
        return manifest

    def in_memory(self, meta: dict) -> "Store":
        """The rows written so far as a Store held in memory (a writer made without a folder)."""
        maps = {name: np.concatenate(parts) for name, parts in self._kept.items()}
        manifest = {"format": FORMAT, "key": None, "rows": self.rows, "tokens": self._tokens, "parts": {},
                    "ragged": self.ragged, "columns": self.columns, "strings": list(self.strings),
                    "files": {name: {"bytes": int(a.nbytes)} for name, a in maps.items()}, "meta": meta}
        return Store(None, manifest, maps)

    def abort(self) -> None:
        for f, _, _ in self._files.values():
            f.close()


def _dtype(code: str) -> np.dtype:
    return np.dtype({"i4": "<i4", "i8": "<i8", "u1": "u1"}[code])


# ----------------------------------------------------------------------------------- reading


class Store:
    """An opened, validated entry: memory-mapped arrays, read on demand."""

    def __init__(self, folder: Path | None, manifest: dict, arrays: dict[str, np.ndarray] | None = None):
        self.folder, self.manifest = folder, manifest
        self.rows: int = manifest["rows"]
        self.meta: dict = manifest["meta"]
        self._maps: dict[str, np.ndarray] = dict(arrays or {})

    @property
    def key(self) -> str:
        return self.manifest["key"]

    def _map(self, name: str, dtype: str) -> np.ndarray:
        if name not in self._maps:
            path = self.folder / name
            size = self.manifest["files"][name]["bytes"]
            self._maps[name] = np.memmap(path, dtype=dtype, mode="r") if size else np.zeros(0, dtype=dtype)
        return self._maps[name]

    def mapped(self) -> "Store":
        """Every file mapped now (under the caller's lock): a later deletion of the entry does not
        pull the data from under this reader (a mapped file lives on after its unlink)."""
        for name in self.manifest["files"]:
            code = name.rsplit(".", 1)[1]
            self._map(name, "u1" if code == "utf8" else _dtype(code).str)
        return self

    def offsets(self) -> np.ndarray:
        return self._map("offsets.i8", "<i8")

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets())

    def ragged(self, column: str) -> np.ndarray:
        """The flat values of a ragged column (row i: [offsets[i], offsets[i+1]))."""
        dtype = self.manifest["ragged"][column]
        return self._map(f"{column}.{dtype}", _dtype(dtype).str)

    def column(self, column: str) -> np.ndarray:
        dtype = self.manifest["columns"][column]
        return self._map(f"{column}.{dtype}", _dtype(dtype).str)

    def string(self, column: str, i: int) -> str:
        ends = self._map(f"{column}.offsets.i8", "<i8")
        data = self._map(f"{column}.utf8", "u1")
        return bytes(data[ends[i] : ends[i + 1]]).decode("utf-8")


def validate(folder: Path, key: str, full: bool = False) -> tuple[dict | None, str | None]:
    """(manifest, None) for an intact entry, else (None, why it is not). The cheap check (see the
    module's docstring) always; with `full` also every file's sha256 against the manifest."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, "no manifest (a build that did not finish)"
    except (OSError, ValueError) as e:
        return None, f"unreadable manifest ({type(e).__name__})"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("key") != key:
        return None, "manifest of another format or key"
    files = manifest.get("files", {})
    for name, want in files.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != want["bytes"]:
            return None, f"{name} is missing or has the wrong size"
    if "offsets.i8" in files:
        ends = np.memmap(folder / "offsets.i8", dtype="<i8", mode="r")
        if len(ends) != manifest.get("rows", -1) + 1 or ends[0] != 0 or ends[-1] != manifest.get("tokens"):
            return None, "offsets.i8 does not agree with the manifest's rows and tokens"
    if full:
        for name, want in files.items():
            if _sha256_file(folder / name) != want["sha256"]:
                return None, f"{name} does not match its checksum"
    return manifest, None


def verify_requested() -> bool:
    """$TUNELAB_DATA_CACHE_VERIFY=1: every hit also compares the checksums (reads the whole entry)."""
    return os.environ.get("TUNELAB_DATA_CACHE_VERIFY", "").strip().lower() in ("1", "true", "yes")


def _make_root(root: Path) -> None:
    """The cache folder, made when missing; InputError when it cannot be (a file in its place or above it,
    no permission): a setting of the user's ($TUNELAB_DATA_CACHE), not an internal error."""
    import errno

    from tunelab.errors import InputError

    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise
        why = "a file is in its place" if isinstance(e, FileExistsError) else e.strerror
        raise InputError(f"cannot make the encoded-data cache folder ({why}): set $TUNELAB_DATA_CACHE to a folder "
                         "tunelab may write, or data.cache: false", file=root, field="data.cache") from None


@contextmanager
def _locked(root: Path, key: str, shared: bool = False):
    _make_root(root)
    with open(root / f".lock-{key}", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _discard(folder: Path) -> None:
    """Move a folder aside (atomically), then delete it: no reader sees it half deleted."""
    aside = folder.parent / f".bad-{folder.name}-{os.getpid()}"
    try:
        os.rename(folder, aside)
    except OSError:
        return
    shutil.rmtree(aside, ignore_errors=True)


def _writer(folder: Path | None, layout: dict) -> StoreWriter:
    return StoreWriter(folder, layout.get("ragged", {}), layout.get("columns", {}), tuple(layout.get("strings", ())))


def open_or_build(parts: dict, layout: dict, build: Callable[[StoreWriter], dict], what: str = "data",
                  verify: bool | None = None, keep: bool = True, quiet: bool = False) -> Store:
    """The intact entry for `parts`, building it with `build(writer) -> meta` when there is none.

    `layout`: {"ragged": {name: dtype}, "columns": {name: dtype}, "strings": (names...)}. An
    exception in `build` (bad input) leaves nothing behind. `verify`: also compare the checksums on
    a hit (default: $TUNELAB_DATA_CACHE_VERIFY). `keep` False (data.cache: false): build in memory,
    neither read nor write the cache; the same arrays, so the same rows. `quiet`: a hit or a build is
    logged at DEBUG, not INFO (a check pass's small entry: a bad input later in the same pass must
    leave its one-line error alone on stderr).
    """
    if not keep:
        writer = _writer(None, layout)
        return writer.in_memory(build(writer))
    say = log.debug if quiet else log.info
    root = data_cache_root()
    key = entry_key(parts)
    final = root / key
    full = verify_requested() if verify is None else verify
    if final.exists():  # the common case, a hit: a shared lock, so readers never queue behind each other
        with _locked(root, key, shared=True):
            manifest, _ = validate(final, key, full)
            if manifest is not None:
                say("%s: encoded data read from the cache (%s)", what, final)
                return Store(final, manifest).mapped()
    with _locked(root, key):
        if final.exists():  # damaged, or built by another process while this one waited
            manifest, why = validate(final, key, full)
            if manifest is not None:
                say("%s: encoded data read from the cache (%s)", what, final)
                return Store(final, manifest).mapped()
            log.warning("%s: the data cache entry %s is damaged (%s); encoding again", what, final, why)
            _discard(final)
        tmp = root / f".tmp-{key}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        writer = _writer(tmp, layout)
        try:
            meta = build(writer)
            manifest = writer.finish(key, parts, meta)
            os.rename(tmp, final)
        except BaseException:
            writer.abort()
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        say("%s: encoded data cached in %s", what, final)
        return Store(final, manifest).mapped()


# ----------------------------------------------------------------------------------- ls / clear


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def list_entries(verify: bool = False) -> list[dict]:
    """Every encoded-data entry: key, state (ok / damaged / building / deleting), bytes, rows, what it
    encodes; a damaged one says why. `verify`: the full check (every checksum), not only the cheap one."""
    root = data_cache_root()
    out = []
    if not root.is_dir():
        return out
    for folder in sorted(root.iterdir()):
        if not folder.is_dir():
            continue
        entry = {"key": folder.name, "path": str(folder), "bytes": _folder_bytes(folder)}
        if folder.name.startswith((".tmp-", ".bad-")):
            entry["state"] = "building" if folder.name.startswith(".tmp-") else "deleting"
        else:
            m, why = validate(folder, folder.name, full=verify)
            if m is None:
                entry.update(state="damaged", why=why)
            else:
                parts = m.get("parts") if isinstance(m.get("parts"), dict) else {}
                entry.update(state="ok", rows=m.get("rows"), tokens=m.get("tokens"), created=m.get("created"),
                             encoder=parts.get("encoder"),
                             files=[f.get("path") or f.get("hf") for f in parts.get("files", [])])
        out.append(entry)
    return out


def clear_entries() -> dict:
    """Delete every encoded-data entry (not the GGUF conversions); {removed, bytes}."""
    root = data_cache_root()
    removed, freed = 0, 0
    for entry in list_entries():
        if entry["state"] == "building":
            continue  # another process is writing it; its rename would fail on a missing parent otherwise
        freed += entry["bytes"]
        shutil.rmtree(entry["path"], ignore_errors=True)
        removed += 1
    return {"removed": removed, "bytes": freed, "root": str(root)}


__all__ = ["data_cache_root", "file_stamp", "tokenizer_stamp", "entry_key", "open_or_build", "Store",
           "StoreWriter", "validate", "verify_requested", "list_entries", "clear_entries"]
