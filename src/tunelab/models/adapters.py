"""LoRA, DoRA and QLoRA adapters through peft: targets, the adapter folder, reloading and merging.

peft does the adapting; this module decides what tunelab must decide around it:

- which linear modules get adapters (`lora.target_modules`: auto per architecture, all-linear, or
  names checked against the model, so a typo is an input error that lists the real names);
- that a freshly initialised classification head stays fully trainable and is saved with the
  adapter (peft `modules_to_save`), and is never quantised (QLoRA skips it at load time);
- what `final/` holds: the PEFT adapter (adapter_config.json + adapter_model.safetensors), the
  tokenizer, and `tunelab_adapter.json`, which says how to rebuild the base (embedded name, local
  path or hub id; task; label names; quantisation) so `load_adapter` and `merge_adapter` need
  nothing else.

The quantised base QLoRA trains on is models.quantization's business.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from torch import nn

from tunelab.errors import InputError
from tunelab.models.base_ref import peft_base_name, portable_reference, resolve_reference
from tunelab.models.anatomy import head_modules_with_params
from tunelab.models.load import load_causal_lm, load_classifier, quiet_transformers
from tunelab.models.quantization import QLORA_SKIP_MODULES, keep_4bit_trainable, nf4_config, quiet_bitsandbytes

log = logging.getLogger("tunelab")

ADAPTER_INFO = "tunelab_adapter.json"
# all attention and MLP projections of Llama-like models (Llama, Mistral, Qwen2, SmolLM2, ...)
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# how a BERT-like encoder is recognised; `auto` adapts ALL its linear layers (query, key, value, the
# attention output, intermediate and output dense, the pooler), not the LoRA paper's query/value: MiniLM
# on SST-2 (4000 rows, 3 epochs, r 8, lr 1e-3; validation = 1500 long train phrases outside the training
# rows, benchmarks/results/lora_sweep.json, seeds 42/43) 0.861 vs 0.854 for query/value, full fine-tuning
# 0.861; r 16, lr 2e-3/5e-4 and 5 epochs with query/value did not close the gap. Dettmers et al. 2023
# (QLoRA, section 4) found adapting every linear layer necessary to match full fine-tuning.
BERT_TARGETS = ["query", "value"]
# ---------------------------------------------------------------- which modules get adapters


def _linear_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D)  # bitsandbytes' Linear4bit subclasses nn.Linear


def head_modules(model: nn.Module, task: str) -> list[str]:
    """Module names of the task head that LoRA must not adapt.

    Classification: the children next to the pre-trained base (`classifier`, `score`), which are
    new and train fully. Causal LM: the output projection (pre-trained, usually tied to the
    embeddings), which stays frozen.
    """
    if task == "classification":
        return head_modules_with_params(model)
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [n for n, m in model.named_modules() if out is not None and m is out]


def linear_modules(model: nn.Module, exclude: list[str]) -> dict[str, nn.Module]:
    """Linear layers by full name, outside the excluded heads."""
    types = _linear_types()
    return {n: m for n, m in model.named_modules()
            if isinstance(m, types) and not any(n == e or n.startswith(e + ".") for e in exclude)}


def resolve_targets(model: nn.Module, target_modules, exclude: list[str]) -> list[str]:
    """`lora.target_modules` -> module names peft matches (leaf names, or full names)."""
    linear = linear_modules(model, exclude)
    leaf = sorted({n.rsplit(".", 1)[-1] for n in linear})
    if target_modules == "all-linear":
        return leaf
    if target_modules == "auto":
        if {"q_proj", "v_proj"} <= set(leaf):
            return [t for t in LLAMA_TARGETS if t in leaf]
        if set(BERT_TARGETS) <= set(leaf):
            return leaf
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as known

        guess = known.get(getattr(getattr(model, "config", None), "model_type", None))
        if guess and set(guess) <= set(leaf):
            return list(guess)
        log.info("lora: no default targets for %s; adapting all linear layers", type(model).__name__)
        return leaf
    unknown = [t for t in target_modules if t not in leaf and t not in linear]
    if unknown:
        raise InputError(f"{', '.join(map(repr, unknown))} is not a linear module of {type(model).__name__}; "
                         f"its linear modules are: {', '.join(leaf)} (or use auto / all-linear)",
                         field="lora.target_modules")
    return list(target_modules)


# ---------------------------------------------------------------- apply


def apply_lora(model: nn.Module, lora, *, method: str = "lora", task: str = "causal_lm") -> nn.Module:
    """Wrap `model` in a peft LoRA/DoRA model; only adapters (and a new head) stay trainable.

    `lora` is the config's lora section (config.LoraConfig: r, alpha, dropout, target_modules,
    rslora, dora); `method` (lora or qlora) and `task` decide the head and
    whether the base must already be 4-bit. Combinations that act on the base's own weights
    (gradual unfreezing, Mixout) are refused by the config's cross-field rules (config.py)."""
    quiet_bitsandbytes()
    from peft import LoraConfig as PeftLoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training

    heads = head_modules(model, task)
    targets = resolve_targets(model, lora.target_modules, heads)
    if getattr(model, "is_loaded_in_4bit", False):
        # freezes the base and keeps norms/heads in fp32; gradient checkpointing is a separate choice
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        keep_4bit_trainable(model)
    elif method == "qlora":
        raise InputError("method qlora needs a base loaded in 4-bit (the task setup did not quantise it)",
                         field="method")
    classification = task == "classification"
    peft_cfg = PeftLoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
        exclude_modules=heads or None, use_rslora=lora.rslora, use_dora=lora.dora, bias="none",
        task_type=TaskType.SEQ_CLS if classification else TaskType.CAUSAL_LM,
        modules_to_save=heads if classification else None,
    )
    model = get_peft_model(model, peft_cfg)
    if lora.lean_dropout and not lora.dora:
        from tunelab.models.lora_dropout import lean_lora_dropout

        lean_lora_dropout(model, recompute_inputs=lora.recompute_inputs)
    return model


def is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


# ---------------------------------------------------------------- the adapter folder


def base_reference(model_name: str) -> str:
    """How `final/` names its base: the embedded name, an absolute local path, or the hub id."""
    from tunelab.models.registry import EMBEDDED

    if model_name in EMBEDDED:
        return model_name
    path = Path(model_name).expanduser()
    return str(path.resolve()) if path.exists() else model_name


def adapter_info(model, lora, *, method: str, task: str, labels: list[str] | None) -> dict:
    """What `tunelab_adapter.json` holds: how to rebuild the base (`model`: the config's model
    section, config.ModelConfig), the adapter's settings (`lora`: its lora section), the
    quantisation of a QLoRA base, and the label names."""
    info = {
        "format": "peft", "method": method, "task": task,
        "base_model": base_reference(model.name),
        "base": portable_reference(model.name, model.revision),  # what loads it elsewhere (models.base_ref)
        "trust_remote_code": model.trust_remote_code, "revision": model.revision,
        "lora": json.loads(lora.model_dump_json()),
        "quantization": {"load_in_4bit": True, "quant_type": "nf4", "double_quant": True,
                         "skip_modules": QLORA_SKIP_MODULES} if method == "qlora" else None,
    }
    if labels is not None:
        info["labels"] = list(labels)
    return info


def adapter_saver(save_final, model_cfg, lora, *, method: str, task: str, labels: list[str] | None = None):
    """Wrap a task's `save_final`: the adapter, the tokenizer, tunelab_adapter.json, and `merged/`
    when `lora.merge`."""

    def save(model, out: Path) -> None:
        save_final(model, out)  # PeftModel.save_pretrained writes the adapter only
        gen = getattr(model, "generation_config", None)
        if task != "classification" and gen is not None:
            gen.save_pretrained(out)
        info = adapter_info(model_cfg, lora, method=method, task=task, labels=labels)
        (out / ADAPTER_INFO).write_text(json.dumps(info, indent=1), encoding="utf-8")
        peft_cfg = out / "adapter_config.json"  # peft wrote this machine's absolute path of the base there
        if peft_cfg.is_file():
            data = json.loads(peft_cfg.read_text())
            data["base_model_name_or_path"] = peft_base_name(info["base"])
            peft_cfg.write_text(json.dumps(data, indent=2), encoding="utf-8")
        if lora.merge:
            merge_adapter(out, out / "merged")

    return save


def find_adapter(path: str | Path) -> Path:
    """An adapter folder, given it or a run dir whose final/ holds one."""
    path = Path(path)
    if not path.exists():
        raise InputError("not found", file=path)
    for cand in (path, path / "final"):
        if (cand / "adapter_config.json").is_file():
            if not (cand / ADAPTER_INFO).is_file():
                raise InputError(f"PEFT adapter without {ADAPTER_INFO} (not written by tunelab); "
                                 "load it with peft's AutoPeftModel", file=cand)
            return cand
    raise InputError("not an adapter folder nor a run dir with an adapter in final/ (no adapter_config.json)", file=path)


def read_adapter_info(adapter_dir: Path) -> dict:
    return json.loads((Path(adapter_dir) / ADAPTER_INFO).read_text())


def tunelab_start(name: str | Path) -> Path | None:
    """The model folder of a tunelab run named by its run dir or its final/ (a full model folder or a
    tunelab adapter); None when `name` is no folder. Preference tuning starts from one (SFT -> DPO),
    and an adapter trained on top of it names it as its base."""
    path = Path(name).expanduser()
    if not path.is_dir():
        return None
    if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file() and (path / "final").is_dir():
        path = path / "final"
    return path


def load_base(info: dict, *, quantized: bool = False, where: Path | None = None):
    """The base model an adapter was trained on, rebuilt from `tunelab_adapter.json` (fp32 or NF4)."""
    from tunelab.models.registry import resolve_model

    start = tunelab_start((info.get("base") or {}).get("path") or info["base_model"])
    if start is not None and (start / ADAPTER_INFO).is_file():  # trained on a tunelab LoRA run (SFT -> DPO)
        return load_adapter(start, merge=True)[0]
    if start is not None and (start / "config.json").is_file():  # a run dir's final/ here, as at training
        name = str(start)
    else:
        name = resolve_reference(info["base"], where) if info.get("base") else info["base_model"]
    source = resolve_model(name)
    quant = nf4_config(info["quantization"]["skip_modules"]) if quantized and info.get("quantization") else None
    common = {"trust_remote_code": info.get("trust_remote_code", False), "revision": info.get("revision"),
              "quantization": quant}
    if info["task"] == "classification":
        model = load_classifier(source, info["labels"], **common)
    else:
        from tunelab.models.gguf import plain_source

        model = load_causal_lm(plain_source(source), **common)
    keep_4bit_trainable(model)  # the same kernels as in training: the same numbers as the run's eval
    return model


def load_adapter(path: str | Path, *, merge: bool = False, quantized: bool | None = None,
                 adapter_name: str = "default"):
    """(model, tokenizer, info) from an adapter folder or a run dir.

    The base is rebuilt as it was trained (NF4 for a QLoRA adapter) unless `quantized` says
    otherwise; `merge=True` folds the adapter into an fp32 base and returns a plain model.
    """
    from peft import PeftModel
    from transformers import AutoTokenizer

    adapter_dir = find_adapter(path)
    info = read_adapter_info(adapter_dir)
    if quantized is None:
        quantized = bool(info.get("quantization")) and not merge
    if merge and quantized:
        raise ValueError("merge into a 4-bit base would re-quantise it; merge into the fp32 base instead")
    quiet_transformers()
    quiet_bitsandbytes()
    base = load_base(info, quantized=quantized, where=adapter_dir)
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    if getattr(base.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        base.config.pad_token_id = tokenizer.pad_token_id
    if (adapter_dir / "generation_config.json").is_file():
        from transformers import GenerationConfig

        base.generation_config = GenerationConfig.from_pretrained(adapter_dir)
    model = PeftModel.from_pretrained(base, adapter_dir, adapter_name=adapter_name)
    model.eval()
    if merge:
        model = model.merge_and_unload()
    return model, tokenizer, info


def add_adapter(model, path: str | Path, adapter_name: str) -> dict:
    """Load a second adapter onto an already loaded base (no reload); `model.set_adapter(name)` switches."""
    adapter_dir = find_adapter(path)
    info = read_adapter_info(adapter_dir)
    base = model.peft_config[model.active_adapter].base_model_name_or_path
    other = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if base and other and Path(base).name != Path(other).name:
        raise InputError(f"adapter was trained on {other}, the loaded base is {base}", file=adapter_dir)
    model.load_adapter(str(adapter_dir), adapter_name=adapter_name)
    return info


def merge_adapter(path: str | Path, out: str | Path) -> dict:
    """Write a plain HF model folder: the fp32 base with the adapter folded in, plus the tokenizer."""
    adapter_dir = find_adapter(path)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise InputError("output folder exists and is not empty; choose another", file=out)
    model, tokenizer, info = load_adapter(adapter_dir, merge=True)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        out.rmdir()
    tmp.replace(out)
    n = sum(p.numel() for p in model.parameters())
    return {"adapter": str(adapter_dir), "merged": str(out), "base_model": info["base_model"],
            "task": info["task"], "method": info["method"], "params": n,
            "from_quantized_training": bool(info.get("quantization"))}


def load_for_inference(path: str | Path):
    """(model, tokenizer) for eval/generate: a LoRA adapter merged into its fp32 base (a plain, fast
    model); a QLoRA adapter on its 4-bit base, as it was trained and evaluated."""
    info = read_adapter_info(find_adapter(path))
    model, tokenizer, _ = load_adapter(path, merge=not info.get("quantization"))
    return model, tokenizer
