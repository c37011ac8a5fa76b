"""Helping a person who typed the wrong name: "did you mean" for config keys and model names, and
the list of every config key (`tunelab config --list`).

Keys: first the names other tools use for the same thing (the transformers Trainer, TRL, axolotl,
LLaMA-Factory: `learning_rate` -> `optim.lr`, `per_device_train_batch_size` -> `train.batch_size`,
`sequence_len` -> `model.max_length`), then close spellings within the section the key was in,
then close spellings anywhere. Every suggestion is checked against the schema, so it always
names a key that exists. The schema (tunelab.config.Config) is passed in: config.py calls this
module, so this module does not import it back.
"""

from __future__ import annotations

import difflib
import json
import typing

from pydantic import BaseModel

# other tools' names -> tunelab's dotted key (or a hint when the thing is spelled differently here)
ALIASES = {
    "learning_rate": "optim.lr", "lr": "optim.lr", "weight_decay": "optim.weight_decay",
    "adam_beta1": "optim.betas", "adam_beta2": "optim.betas", "adam_epsilon": "optim.eps",
    "per_device_train_batch_size": "train.batch_size", "micro_batch_size": "train.batch_size",
    "train_batch_size": "train.batch_size", "batch_size": "train.batch_size",
    "per_device_eval_batch_size": "train.eval_batch_size", "eval_batch_size": "train.eval_batch_size",
    "gradient_accumulation_steps": "train.grad_accum", "gradient_accumulation": "train.grad_accum",
    "num_train_epochs": "train.epochs", "num_epochs": "train.epochs", "epochs": "train.epochs",
    "max_steps": "train.max_steps", "seed": "train.seed", "max_grad_norm": "train.max_grad_norm",
    "gradient_checkpointing": "train.gradient_checkpointing", "bf16": "train.precision", "fp16": "train.precision",
    "logging_steps": "train.log_every", "eval_steps": "train.eval_every",
    "sequence_len": "model.max_length", "max_seq_length": "model.max_length", "max_seq_len": "model.max_length",
    "seq_length": "model.max_length", "cutoff_len": "model.max_length", "model_max_length": "model.max_length",
    "max_length": "model.max_length", "base_model": "model.name", "model_name_or_path": "model.name",
    "model_name": "model.name", "trust_remote_code": "model.trust_remote_code",
    "warmup_ratio": "schedule.warmup_ratio", "warmup_steps": "schedule.warmup_steps",
    "lr_scheduler_type": "schedule.name", "lr_scheduler": "schedule.name", "scheduler": "schedule.name",
    "save_steps": "checkpoint.save_every", "save_total_limit": "checkpoint.keep_last",
    "metric_for_best_model": "checkpoint.metric", "early_stopping_patience": "early_stopping.patience",
    "lora_r": "lora.r", "lora_alpha": "lora.alpha", "lora_dropout": "lora.dropout",
    "lora_target_modules": "lora.target_modules", "target_modules": "lora.target_modules",
    "use_rslora": "lora.rslora", "use_dora": "lora.dora", "peft_use_dora": "lora.dora",
    "train_file": "data.train", "dataset": "data.train", "datasets": "data.train", "data_path": "data.train",
    "validation_file": "data.eval", "eval_file": "data.eval", "val_set_size": "data.eval_split",
    "sample_packing": "data.packing", "packing": "data.packing", "text_field": "data.text_column",
    "dataset_text_field": "data.text_column", "report_to": "monitor.loggers", "wandb_project": "monitor.project",
    "run_name": "monitor.run_name", "adapter": "method", "finetuning_type": "method", "load_in_4bit": "method",
}
HINTS = {"output_dir": "the run dir is a flag: tunelab train CONFIG -o DIR",
         "load_in_4bit": "4-bit training is method: qlora", "adapter": "LoRA is method: lora (or qlora)",
         "bf16": "precision is train.precision: bf16 | fp16 | fp32 | auto",
         "fp16": "precision is train.precision: bf16 | fp16 | fp32 | auto"}

MODEL_ALIASES = {"all-minilm-l6-v2": "minilm", "sentence-transformers/all-minilm-l6-v2": "minilm",
                 "minilm-l6": "minilm", "all-minilm": "minilm", "smollm2-135m-instruct": "smollm2-135m-instruct",
                 "smollm2": "smollm2-135m-instruct", "smollm2-135m": "smollm2-135m-instruct",
                 "smollm": "smollm2-135m-instruct", "huggingfacetb/smollm2-135m-instruct": "smollm2-135m-instruct"}

LIST_HINT = "`tunelab config --list` lists every key"


def _section_type(annotation):
    """The pydantic model class a field holds, if it is a section (Optional[...] unwrapped)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def schema_keys(model: type[BaseModel], prefix: str = "") -> list[dict]:
    """Every config key of `model` (tunelab.config.Config): {key, type, default, description}, sections
    walked recursively, in file order."""
    out = []
    for name, field in model.model_fields.items():
        if name == "versions":
            continue
        section = _section_type(field.annotation)
        key = f"{prefix}{name}"
        if section is not None:
            out += schema_keys(section, key + ".")
            continue
        default = field.get_default(call_default_factory=True) if not field.is_required() else "(required)"
        out.append({"key": key, "type": _type_name(field.annotation), "default": _plain(default),
                    "description": field.description or ""})
    return out


def _type_name(annotation) -> str:
    text = str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")
    return text.replace("NoneType", "None")


def _plain(v):
    try:
        json.dumps(v)
        return v
    except TypeError:
        return str(v)


def suggest_key(loc: tuple, schema: type[BaseModel]) -> str | None:
    """The key of `schema` a person probably meant by the unknown key at `loc` (a tuple of parts), or None."""
    parts = [str(p) for p in loc]
    if not parts:
        return None
    keys = [k["key"] for k in schema_keys(schema)]
    sections = {k.split(".")[0] for k in keys if "." in k}
    valid = set(keys) | sections
    name, parent = parts[-1], ".".join(parts[:-1])
    low = name.lower().replace("-", "_")
    target = ALIASES.get(low)
    if target is None:  # a misspelt other-tool name: learnig_rate
        near = difflib.get_close_matches(low, list(ALIASES), n=1, cutoff=0.85)
        target = ALIASES[near[0]] if near else None
    if target in valid and target != ".".join(parts):
        return target
    if parent:
        inside = [k.removeprefix(parent + ".") for k in keys if k.startswith(parent + ".")]
        close = difflib.get_close_matches(low, inside, n=1, cutoff=0.6)
        if close:
            return f"{parent}.{close[0]}"
    else:
        close = difflib.get_close_matches(low, sorted(sections | {k for k in keys if "." not in k}), n=1, cutoff=0.7)
        if close:
            return close[0]
    leaves = {k.rsplit(".", 1)[-1]: k for k in keys}
    close = difflib.get_close_matches(low, list(leaves), n=1, cutoff=0.75)
    return leaves[close[0]] if close else None


def unknown_key_message(loc: tuple, schema: type[BaseModel]) -> str:
    """The whole message for an unknown key: what it probably is, and where every key is listed."""
    parts = [str(p) for p in loc]
    hint = HINTS.get(parts[-1].lower()) if parts else None
    guess = suggest_key(loc, schema)
    said = f"unknown key; did you mean {guess}?" if guess else "unknown key (check the spelling)"
    if hint:
        said += f" ({hint})"
    return f"{said}; {LIST_HINT}"


def suggest_model(name: str, embedded: typing.Iterable[str]) -> str | None:
    """The embedded model a name probably means ('SmolLM2-135M-Instruct' -> 'smollm2-135m-instruct')."""
    embedded = list(embedded)
    low = name.strip().lower()
    if low in MODEL_ALIASES and MODEL_ALIASES[low] in embedded:
        return MODEL_ALIASES[low]
    close = difflib.get_close_matches(low, embedded + list(MODEL_ALIASES), n=1, cutoff=0.6)
    if not close:
        return None
    return MODEL_ALIASES.get(close[0], close[0]) if MODEL_ALIASES.get(close[0], close[0]) in embedded else None


def format_keys(keys: list[dict]) -> str:
    """`tunelab config --list` for a terminal: one key per line, its default, and what it does."""
    width = max(len(k["key"]) for k in keys)
    lines, section = [], None
    for k in keys:
        top = k["key"].split(".")[0] if "." in k["key"] else ""
        if top != section:
            section = top
            lines.append(f"\n{top}:" if top else "top level:")
        default = json.dumps(k["default"]) if not isinstance(k["default"], str) else k["default"]
        desc = f"  {k['description']}" if k["description"] else ""
        lines.append(f"  {k['key']:<{width}}  = {default}{desc}")
    return "\n".join(lines).lstrip("\n")
