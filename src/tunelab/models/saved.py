"""Load a saved model folder for evaluation or generation: a plain HF folder, or a LoRA/QLoRA final/.

Apart from models.load (which loads bases) because an adapter folder is rebuilt through
models.adapters, which itself loads its base through models.load: one direction, no circle.
"""

from __future__ import annotations

from pathlib import Path

from tunelab.errors import InputError
from tunelab.models.adapters import load_for_inference
from tunelab.models.load import NO_HUB_KERNELS, _check_safetensors, _check_tokenizer_files, _first_line, quiet_transformers


def load_saved(path: str | Path, kind: str = "classifier"):
    """A saved model folder (ours or any HF one; a LoRA/QLoRA final/ too) with its tokenizer.

    kind: "classifier" (AutoModelForSequenceClassification) or "causal_lm" (AutoModelForCausalLM).
    The same safety checks as for a base model: safetensors headers, tokenizer files present.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    quiet_transformers()
    path = Path(path)
    if not path.exists():
        raise InputError("model folder not found", file=path)
    if not path.is_dir():
        raise InputError("expected a model folder, found a file", file=path)
    if (path / "adapter_config.json").is_file():  # a LoRA/QLoRA final/: rebuild the base, add the adapter
        return load_for_inference(path)
    if not (path / "config.json").is_file():
        raise InputError("not a model folder (no config.json)", file=path)
    _check_safetensors(path)
    _check_tokenizer_files(path)
    auto = AutoModelForSequenceClassification if kind == "classifier" else AutoModelForCausalLM
    try:
        model = auto.from_pretrained(path, dtype="float32", **NO_HUB_KERNELS)
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, RuntimeError) as e:
        raise InputError(f"cannot load the model: {_first_line(e)}", file=path) from None
    return model, tok


def load_saved_classifier(path: str | Path):
    """A fine-tuned classifier folder with its tokenizer, for evaluation."""
    return load_saved(path, "classifier")


def load_saved_causal_lm(path: str | Path):
    """A saved causal-LM folder (e.g. RUN/final) with its tokenizer, for generation and chat."""
    return load_saved(path, "causal_lm")
