"""The model a run stands for, as exports need it: a plain causal LM in fp32, adapters folded in.

`tunelab export RUN` and `tunelab push RUN` accept a run dir (its final/), a saved model folder
or a LoRA/QLoRA adapter folder. A QLoRA adapter is merged into the fp32 base (never into the
4-bit one, which would re-quantise it), so the exported weights are the base plus the trained
delta at full precision.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import InputError


@dataclass
class Source:
    """What an export starts from."""

    folder: Path  # the model or adapter folder (RUN/final for a run)
    run_dir: Path | None  # the run dir, when one was given (for its training data and config)
    is_adapter: bool


def locate(path: str | Path) -> Source:
    """Resolve a run dir, model folder or adapter folder; InputError naming it when it is none."""
    path = Path(path)
    if not path.exists():
        raise InputError("not found", file=path)
    if not path.is_dir():
        raise InputError("expected a run dir or a model folder, found a file", file=path)
    run_dir = path if (path / "final").is_dir() else None
    folder = path / "final" if run_dir is not None else path
    if (folder / "adapter_config.json").is_file():
        return Source(folder, run_dir, True)
    if (folder / "config.json").is_file():
        return Source(folder, run_dir, False)
    raise InputError("not a run dir, model folder or adapter folder (no final/, config.json or adapter_config.json)",
                     file=path)


def load_merged(src: Source):
    """(model, tokenizer) in fp32, eval mode, any adapter merged into its fp32 base."""
    if is_classifier(src.folder):
        raise InputError("GGUF / Ollama export writes causal LMs; this is a classifier "
                         "(use tunelab merge for a plain Hugging Face folder)", file=src.folder)
    if src.is_adapter:
        from tunelab.models.adapters import load_adapter

        model, tokenizer, _ = load_adapter(src.folder, merge=True, quantized=False)
    else:
        from tunelab.models.saved import load_saved_causal_lm

        model, tokenizer = load_saved_causal_lm(src.folder)
    return model.float().eval(), tokenizer


def is_classifier(folder: Path) -> bool:
    """Whether a model or adapter folder holds a sequence classifier (the adapter's task, else the
    model's architecture): exports take causal LMs only, and the API loads each with its own class."""
    import json

    info = folder / "tunelab_adapter.json"
    if info.is_file():
        return json.loads(info.read_text()).get("task") == "classification"
    cfg = folder / "config.json"
    archs = (json.loads(cfg.read_text()).get("architectures") or []) if cfg.is_file() else []
    return any(a.endswith("ForSequenceClassification") for a in archs)


def training_prompts(src: Source, tokenizer, n: int = 3) -> list[str]:
    """A few prompts in the form the model was trained on, for the checks after an export.

    The run's own training conversations, cut before their first assistant turn and rendered with
    the chat template; plain text for causal-LM runs; a fixed set when no run data is at hand.
    """
    texts = _run_prompts(src, tokenizer, n) if src.run_dir is not None else []
    if texts:
        return texts
    fallback = ["What is the capital of France?", "Write one sentence about the sea.", "List three colours."]
    if tokenizer.chat_template:
        return [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                              tokenize=False) for q in fallback[:n]]
    return fallback[:n]


def _run_prompts(src: Source, tokenizer, n: int) -> list[str]:
    import yaml

    cfg_path = src.run_dir / "config.yaml"
    if not cfg_path.is_file():
        return []
    cfg = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}
    data = (cfg.get("data") or {}).get("train")
    if isinstance(data, list):  # sources mixed by weight: the prompts come from the first
        data = data[0].get("path") if data and isinstance(data[0], dict) else None
    if not data or not Path(data).is_file() or cfg.get("task") == "classification":
        return []
    from tunelab.data.chat import read_chat_data

    try:
        read = read_chat_data(data, fmt=(cfg.get("data") or {}).get("format", "auto"))
    except InputError:
        return []
    if read.kind != "conversations":
        return [t[:400] for t in read.texts[:n]]
    out = []
    for conv in read.conversations[:n]:
        head = []
        for m in conv:
            if m.role == "assistant":
                break
            head.append({"role": m.role, "content": m.content})
        if head and tokenizer.chat_template:
            out.append(tokenizer.apply_chat_template(head, add_generation_prompt=True, tokenize=False))
    return out
