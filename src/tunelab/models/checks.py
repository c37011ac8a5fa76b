"""Load-time checks of a base model: its files before transformers reads them, its weights after.

transformers is lenient where a fine-tuning run must not be: with `ignore_mismatched_sizes` it
re-initialises any tensor of the wrong shape, a missing layer tensor starts random with a log line
nobody sees, a NaN in the weights trains into a "diverged" run. Here every such problem is an
InputError naming the tensor; only a new task head may be (re)initialised, and that is said in one
line after the setup succeeds (`load_note`).
"""

from __future__ import annotations

import json
from pathlib import Path

from tunelab.errors import InputError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# Names of task heads (and the BERT pooler that feeds the classification head): new for a new task.
HEAD_PARTS = ("classifier", "score", "pre_classifier", "pooler", "qa_outputs", "lm_head", "cls", "head", "heads")
# Buffers some checkpoints carry that a newer model computes itself.
IGNORABLE = ("position_ids", "inv_freq", "num_batches_tracked", "masked_bias", "attn.bias")


def _is_head(name: str) -> bool:
    return any(part in HEAD_PARTS for part in name.split(".")[:2])


def _read_json(path: Path, field: str | None):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{path.name} is not valid JSON ({str(e).splitlines()[0][:120]})", file=path, field=field) from None


def check_config_json(folder: Path, field: str | None = "model.name") -> None:
    """config.json must be a JSON object, and the attention heads must divide the hidden size."""
    path = folder / "config.json"
    if not path.is_file():
        return
    cfg = _read_json(path, field)
    if not isinstance(cfg, dict):
        raise InputError(f"config.json must be a JSON object, found a {type(cfg).__name__}", file=path, field=field)
    for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "intermediate_size"):
        v = cfg.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise InputError(f"config.json: {key} must be a positive integer, got {v!r}", file=path, field=field)
    hidden, heads = cfg.get("hidden_size"), cfg.get("num_attention_heads")
    if isinstance(hidden, int) and isinstance(heads, int) and hidden % heads:
        raise InputError(f"config.json: num_attention_heads {heads} does not divide hidden_size {hidden}",
                         file=path, field=field)


def check_tokenizer_json(folder: Path, field: str | None = "model.name") -> None:
    """A tokenizer.json that is not JSON fails inside the Rust tokenizers with an error of no known type."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return
    obj = _read_json(path, field)
    if not isinstance(obj, dict) or "model" not in obj:
        raise InputError("tokenizer.json is not a tokenizers file (no 'model' entry)", file=path, field=field)


def refuse_pickles(folder: Path, allow_pickle: bool, field: str | None = "model.name") -> list[str]:
    """The pickle weight files of a folder without safetensors: refused unless the config opts in
    (model.allow_pickle: true), and then transformers loads them with weights_only=True."""
    pickles = sorted(p.name for p in folder.glob("*") if p.suffix in PICKLE_SUFFIXES)
    if pickles and not allow_pickle:
        raise InputError(f"the model folder holds only pickle weights ({', '.join(pickles)}), which can run code when "
                         "loaded; convert them to safetensors, or set model.allow_pickle: true to load them with "
                         "weights_only", file=folder, field=field)
    return pickles


def check_loading_info(info: dict, source: str, *, new_head_ok: bool) -> str | None:
    """transformers' loading report -> an InputError naming a wrong-shaped, missing or extra tensor,
    or the one line saying which new head was initialised (None when nothing was)."""
    mismatched = [(k, list(a), list(b)) for k, a, b in info.get("mismatched_keys", [])]
    missing = [k for k in info.get("missing_keys", []) if not k.endswith(IGNORABLE)]
    unexpected = [k for k in info.get("unexpected_keys", []) if not k.endswith(IGNORABLE)]
    bad_shape = [m for m in mismatched if not (new_head_ok and _is_head(m[0]))]
    if bad_shape:
        k, saved, wanted = bad_shape[0]
        more = f" (and {len(bad_shape) - 1} more)" if len(bad_shape) > 1 else ""
        raise InputError(f"weight {k} has shape {saved} in the checkpoint but the model's config makes it {wanted}{more}: "
                         "config.json and the weights disagree", file=source, field="model.name")
    bad_missing = [k for k in missing if not (new_head_ok and _is_head(k))]
    if bad_missing:
        more = f" (and {len(bad_missing) - 1} more)" if len(bad_missing) > 1 else ""
        raise InputError(f"the weights lack {bad_missing[0]}{more}: the model would start that part random; "
                         "re-download or re-save the model", file=source, field="model.name")
    bad_extra = [k for k in unexpected if not _is_head(k)]
    if bad_extra:
        more = f" (and {len(bad_extra) - 1} more)" if len(bad_extra) > 1 else ""
        raise InputError(f"the weights hold {bad_extra[0]}{more}, which the model's config has no place for "
                         "(config.json of another model?)", file=source, field="model.name")
    fresh = sorted({k for k in missing if _is_head(k)} | {k for k, _, _ in mismatched})
    if fresh:
        return f"new head initialised (not in the base model): {', '.join(fresh)}"
    return None


def check_finite(model, source: str) -> None:
    """NaN or Inf in a base weight is a broken model, not a learning-rate problem: refuse it here."""
    import torch

    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if getattr(t, "quant_state", None) is not None:  # packed 4-bit codes (bfloat16 storage under fsdp), not numbers
            continue
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            raise InputError(f"base weight {name} holds NaN/Inf: the model file is broken (or saved from a diverged "
                             "run); use another model", file=source, field="model.name")


def check_tokenizer_fits(tokenizer, model, source: str) -> None:
    """Every id the tokenizer can produce must have an embedding row (else a crash mid-run)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(emb, "num_embeddings", None)
    n = len(tokenizer)
    if rows is not None and n > rows:
        raise InputError(f"the tokenizer has {n} tokens but the model's embedding only {rows} rows (ids >= {rows} "
                         "would crash mid-run): use the model's own tokenizer", file=source, field="model.name")
