"""Portable references to an adapter's base model, so an adapter loads on another machine.

An absolute path (`/home/me/models/base`, or the embedded SmolLM2's converted folder in a cache)
means nothing on another machine. `tunelab_adapter.json` therefore records the base as one of:

- `{"kind": "embedded", "name": "smollm2-135m-instruct"}`: rebuilt from its PyPI package anywhere;
- `{"kind": "hub", "id": "org/name", "revision": ...}`: the Hub id at the trained revision;
- `{"kind": "local", "relative": "llama/base", "name": "base", "path": "/abs/at/training"}`: a
  folder, as a path relative to the user's model root (`$TUNELAB_MODEL_ROOT`, set where the
  adapter is trained and where it is loaded) when it lies under it. Loading tries, in order: the
  root + `relative`, the recorded absolute `path` (the same machine), the root + `name`.

The PEFT `adapter_config.json` gets the same portable name as `base_model_name_or_path` (the
Hub id of an embedded model, the relative path of a local one), never an absolute path.
"""

from __future__ import annotations

import os
from pathlib import Path

from tunelab.errors import InputError

ROOT_ENV = "TUNELAB_MODEL_ROOT"


def model_root() -> Path | None:
    root = os.environ.get(ROOT_ENV)
    return Path(root).expanduser().resolve() if root else None


def portable_reference(model_name: str, revision: str | None = None) -> dict:
    """The reference for `model.name` as the run resolved it (embedded name, local folder or hub id)."""
    from tunelab.models.registry import EMBEDDED

    if model_name in EMBEDDED:
        return {"kind": "embedded", "name": model_name}
    path = Path(model_name).expanduser()
    if not path.exists():
        return {"kind": "hub", "id": model_name, "revision": revision}
    path = path.resolve()
    ref = {"kind": "local", "name": path.name, "path": str(path), "relative": None}
    root = model_root()
    if root is not None and path.is_relative_to(root):
        ref["relative"] = path.relative_to(root).as_posix()
    return ref


def peft_base_name(ref: dict) -> str:
    """What PEFT's adapter_config.json names as the base: portable, for plain-peft users too."""
    if ref["kind"] == "embedded":
        from tunelab.models.registry import EMBEDDED_ORIGIN

        return EMBEDDED_ORIGIN.get(ref["name"], ref["name"])
    if ref["kind"] == "hub":
        return ref["id"]
    return ref["relative"] or ref["name"]


def resolve_reference(ref: dict, where: Path | None = None) -> str:
    """The `model.name` to load the base from here (an embedded name, a folder or a hub id)."""
    if ref["kind"] == "embedded":
        return ref["name"]
    if ref["kind"] == "hub":
        return ref["id"]
    root = model_root()
    candidates = ([root / ref["relative"]] if root is not None and ref.get("relative") else [])
    candidates += [Path(ref["path"])] if ref.get("path") else []
    candidates += [root / ref["name"]] if root is not None else []
    for cand in candidates:
        if (cand / "config.json").is_file():
            return str(cand)
    hint = ref.get("relative") or ref["name"]
    raise InputError(f"the adapter's base model '{hint}' is not here (it was {ref.get('path')}); set {ROOT_ENV} "
                     f"to the folder that holds '{hint}'" + ("" if root is None else f" (now {root})"),
                     file=where, field="base_model")
