"""Load a tokenizer and a sequence-classification model from a resolved source, safely.

Safety rules: safetensors only (a `.bin`/`.pt` checkpoint is refused unless the config sets
model.allow_pickle, and then loaded by transformers with `weights_only`); `trust_remote_code` only when
the config says so; hub access only for hub ids.

Hub kernels off (`NO_HUB_KERNELS`): transformers 5.25 turns `use_kernels` on by default, so every
`model.train()` / `eval()` that changes the mode re-kernelizes the model: it fetches kernel code
from the Hub at run time (an offline machine logs a failure; an online one runs code nobody pinned,
with its own numbers), and it resets the `forward` of every module decorated for hub kernels (the
RMSNorms among them) to the class's, which silently undid train.recompute_norms
(models/recompute.py) at the loop's first `model.train()`. Found on SmolLM2-135M with transformers
5.25: after `model.train()` no norm was recomputed (tests/test_recompute.py now checks it through
the loader and `train()`).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

from tunelab.errors import InputError
from tunelab.models import checks
from tunelab.models.registry import ModelSource

log = logging.getLogger("tunelab")

NO_HUB_KERNELS = {"use_kernels": False}  # from_pretrained's switch (the module docstring says why)


def quiet_transformers() -> None:
    """transformers prints load reports and progress bars; tunelab reports what matters itself."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _check_weights(source: ModelSource, allow_pickle: bool = False) -> None:
    if source.is_hub or source.gguf_file:
        return
    folder = Path(source.path)
    checks.check_config_json(folder)
    if _check_safetensors(folder, field="model.name"):
        return
    pickles = checks.refuse_pickles(folder, allow_pickle)
    if pickles:
        log.warning(
            "%s holds only pickle weights (%s): loading them with weights_only=True. "
            "Convert to safetensors to be safe.", folder, ", ".join(pickles)
        )
        return
    raise InputError("model folder has no weights (*.safetensors)", file=folder, field="model.name")


def _check_safetensors(folder: Path, field: str | None = None) -> bool:
    """Whether the folder holds safetensors weights; each one's header must read (a garbage or
    truncated file otherwise fails deep inside transformers with an error of no known type)."""
    from safetensors import SafetensorError, safe_open

    files = sorted(folder.glob("*.safetensors"))
    for f in files:
        try:
            with safe_open(f, framework="pt") as st:
                if not list(st.keys()):
                    raise InputError("the safetensors file holds no tensors; re-download or re-save the model",
                                     file=f, field=field)
        except (SafetensorError, OSError, ValueError) as e:
            raise InputError(f"not a valid safetensors file ({_first_line(e)}); re-download or re-save the model",
                             file=f, field=field) from None
    return bool(files)


# A local tokenizer needs one of these; without them transformers 5 quietly builds a tokenizer
# that knows only its special tokens, so every word becomes [UNK] and training learns nothing.
TOKENIZER_FILES = ("tokenizer.json", "vocab*", "merges.txt", "*.model", "*.spm", "*.tiktoken")


def _check_tokenizer_files(folder: Path, field: str | None = None) -> None:
    if folder.is_dir() and not any(any(folder.glob(pattern)) for pattern in TOKENIZER_FILES):
        raise InputError("model folder has no tokenizer files (tokenizer.json, vocab.txt, ...); "
                         "save the tokenizer next to the model", file=folder, field=field)


def load_tokenizer(source: ModelSource, *, trust_remote_code: bool = False, revision: str | None = None):
    from transformers import AutoTokenizer

    quiet_transformers()
    if not (source.is_hub or source.gguf_file or trust_remote_code):
        _check_tokenizer_files(Path(source.path), field="model.name")
        checks.check_config_json(Path(source.path))
        checks.check_tokenizer_json(Path(source.path))
    try:
        tok = AutoTokenizer.from_pretrained(
            source.path, gguf_file=source.gguf_file, trust_remote_code=trust_remote_code, revision=revision
        )
    except Exception as e:  # tokenizers' Rust errors, a broken vocab, a garbage GGUF: the files' fault
        where = Path(source.path) / source.gguf_file if source.gguf_file else source.path
        raise InputError(f"cannot load the tokenizer: {_first_line(e)}", file=where, field="model.name") from None
    return tok


def load_classifier(
    source: ModelSource,
    label_names: list[str],
    *,
    trust_remote_code: bool = False,
    revision: str | None = None,
    quantization=None,
    allow_pickle: bool = False,
):
    """A sequence-classification model with a fresh head sized for `label_names`.

    `quantization`: a transformers quantization config (QLoRA's NF4: models.quantization.nf4_config),
    applied while loading; None loads fp32.
    """
    from transformers import AutoModelForSequenceClassification

    quiet_transformers()
    _check_weights(source, allow_pickle)
    id2label = {i: n for i, n in enumerate(label_names)}
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            source.path,
            gguf_file=source.gguf_file,
            num_labels=len(label_names),
            id2label=id2label,
            label2id={n: i for i, n in id2label.items()},
            ignore_mismatched_sizes=True,
            trust_remote_code=trust_remote_code,
            revision=revision,
            dtype="float32",
            quantization_config=quantization,
            output_loading_info=True,
            **NO_HUB_KERNELS,
        )
    except InputError:
        raise
    except Exception as e:  # transformers raises many types for a broken folder (a list config.json: AttributeError)
        raise InputError(f"cannot load the model: {_first_line(e)}", file=source.path, field="model.name") from None
    return _checked(model, info, source, new_head_ok=True)


def _checked(model, info: dict, source: ModelSource, *, new_head_ok: bool):
    """The loading report and the weights checked (models.checks); the new-head line kept on the model
    as `tunelab_load_note`, said once the whole setup has succeeded."""
    model.tunelab_load_note = checks.check_loading_info(info, source.path, new_head_ok=new_head_ok)
    checks.check_finite(model, source.path)
    return model


def _first_line(e: Exception) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]


def count_params(model) -> tuple[int, int]:
    """(trainable, total) parameter counts, shared tensors counted once.

    A packed 4-bit weight (QLoRA) counts the parameters it stands for, not its bytes; the frozen
    original of a head that peft trains a copy of (`modules_to_save`) is not counted twice.
    """
    seen, trainable, total = set(), 0, 0
    for name, p in model.named_parameters():
        if p.data_ptr() in seen or ".original_module." in name:
            continue
        seen.add(p.data_ptr())
        shape = getattr(getattr(p, "quant_state", None), "shape", None)
        n = math.prod(shape) if shape is not None else p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def load_causal_lm(source: ModelSource, *, trust_remote_code: bool = False, revision: str | None = None,
                   quantization=None, allow_pickle: bool = False):
    """A causal LM in fp32 from a plain source (GGUF sources go through models.gguf.plain_source first);
    `quantization` as for `load_classifier`."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    _check_weights(source, allow_pickle)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(source.path, trust_remote_code=trust_remote_code,
                                                           revision=revision, dtype="float32",
                                                           quantization_config=quantization, output_loading_info=True,
                                                           **NO_HUB_KERNELS)
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"cannot load the model: {_first_line(e)}", file=source.path, field="model.name") from None
    return _checked(model, info, source, new_head_ok=False)


