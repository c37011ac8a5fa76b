"""GGUF -> a plain Hugging Face folder, converted once and cached.

transformers can read a GGUF file (config, tokenizer, de-quantized tensors) but cannot save a
model as GGUF, and its `from_pretrained(..., gguf_file=...)` path needs `accelerate`. So we read
the config and tensors with transformers' GGUF reader (which only needs the `gguf` package),
rebuild the plain architecture from the config, load the state dict into it, and save model,
tokenizer, chat template and generation config as an ordinary safetensors folder. Training,
checkpoints and `final/` then never see GGUF again.

The folder lives in `$TUNELAB_CACHE` (default `~/.cache/tunelab`) under a key made of the file's
name, size and a hash of its first and last MiB; it is written to a temporary folder and renamed
into place, so a killed conversion never leaves a half folder that a later run would trust.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from tunelab.models.registry import ModelSource

log = logging.getLogger("tunelab")

MARKER = "tunelab-gguf.json"


def cache_root() -> Path:
    return Path(os.environ.get("TUNELAB_CACHE") or "~/.cache/tunelab").expanduser()


def _file_key(path: Path) -> str:
    size = path.stat().st_size
    h = hashlib.sha256(f"{path.name}:{size}".encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return f"{path.stem}-{h.hexdigest()[:16]}"


def converted_folder(gguf_path: str | Path) -> Path:
    """Where the plain folder for this GGUF file lives (whether or not it exists yet)."""
    return cache_root() / "gguf" / _file_key(Path(gguf_path))


def end_of_turn_id(tokenizer) -> int | None:
    """The token a chat template closes each turn with (`<|im_end|>` for ChatML), if it has one."""
    template = tokenizer.chat_template or ""
    for tok in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>"):
        if tok in template:
            tid = tokenizer.convert_tokens_to_ids(tok)
            if tid is not None and tid != tokenizer.unk_token_id:
                return tid
    return None


def read_gguf(gguf_path: str | Path):
    """(model in fp32, tokenizer) from a GGUF file, through transformers' GGUF reader (de-quantized).

    Also the reading half of tunelab.export's round trip: an exported file must read back here.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from tunelab.models.load import quiet_transformers

    quiet_transformers()
    gguf_path = Path(gguf_path)
    folder, name = str(gguf_path.parent), gguf_path.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict({k: torch.as_tensor(v) for k, v in tensors.items()}, strict=False)
    tied = getattr(config, "tie_word_embeddings", False)
    if unexpected or [k for k in missing if not (tied and k == "lm_head.weight")]:
        raise RuntimeError(f"GGUF tensors do not fit the architecture: missing {missing}, unexpected {unexpected}")
    if tied:
        model.tie_weights()
    return model.eval(), tokenizer


def convert_gguf(gguf_path: str | Path, out: str | Path) -> Path:
    """Write a plain safetensors HF folder (model, tokenizer, chat template, generation config)."""
    from transformers import GenerationConfig

    gguf_path, out = Path(gguf_path), Path(out)
    model, tokenizer = read_gguf(gguf_path)
    config = model.config
    eot = end_of_turn_id(tokenizer)
    eos = eot if eot is not None else tokenizer.eos_token_id
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / MARKER).write_text(json.dumps({"source": str(gguf_path), "size": gguf_path.stat().st_size}), encoding="utf-8")
    return out


def ensure_converted(gguf_path: str | Path) -> Path:
    """The cached plain folder for `gguf_path`, converting it the first time (atomically)."""
    final = converted_folder(gguf_path)
    if (final / MARKER).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("converting %s to a safetensors folder in %s (once)", Path(gguf_path).name, final)
    try:
        convert_gguf(gguf_path, tmp)
        if final.exists() and not (final / MARKER).is_file():
            shutil.rmtree(final, ignore_errors=True)  # a broken folder from before atomic writes
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / MARKER).is_file():  # not another process winning the race: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def plain_source(source: ModelSource) -> ModelSource:
    """A source without GGUF: GGUF sources are replaced by their cached converted folder."""
    if not source.gguf_file:
        return source
    folder = ensure_converted(Path(source.path) / source.gguf_file)
    return ModelSource(source.name, str(folder))
