"""Defaults per model family, size and method, applied to the keys the user did not set.

Most users give a task, a model and data and change nothing else, so these values decide most
results. One learning rate for everything (2e-5, BERT-base's full fine-tuning value) is wrong for
a 22M encoder, a LoRA adapter or a causal LM: each default below says which measurement or paper
it comes from. A key the user set (in the file, with --set, or through the API) is never touched;
a run dir's config.yaml spells every key out, so a resume resolves nothing and trains what it
trained before.

`apply_defaults(cfg)` fills the keys and records what it chose (`resolved_defaults(cfg)`: key ->
{value, why}); run.py writes that record into summary.json (`defaults`) and `tunelab plan`
prints it. The resolved values themselves are in the run's config.yaml like any other key.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.models.families import gated_mlp, is_encoder

# parameters of the embedded models (count_params on the loaded models), so no file is read for them
EMBEDDED_SIZES = {"minilm": ("encoder", 22_713_216), "smollm2-135m-instruct": ("causal", 134_515_008)}

# measured (benchmarks/README.md, "How the defaults were chosen"): SST-2, first 4000 train rows, MiniLM, 3 epochs,
# dev rows 1-2000: body lr 2e-5 with head x20 and batch 8 (run C) 0.8705; lr 1e-4, head 1e-4, batch 16 (B) 0.8770;
# lr 1e-4, head 1e-3, batch 8 (F) 0.8795, the best measured. The independent sentence-level test: the
# Trainer at 1e-4 0.843 vs 0.825 at 2e-5.
SMALL_ENCODER_LR = 1e-4
SMALL_ENCODER_WHY = ("SST-2 4000 rows, MiniLM-L6: lr 1e-4 with the head at 1e-3 and batch 8 gave 0.8795 dev accuracy "
                     "vs 0.8705 at 2e-5 (benchmarks/README.md, runs F and C), and the Trainer at 1e-4 beat 2e-5 on an "
                     "independent sentence-level test (0.843 vs 0.825); small BERTs want ~1e-4 (Turc et al. 2019, "
                     "'Well-Read Students Learn Better')")
HEAD_LR = 1e-3  # the new head's rate when the body trains at >= 1e-4 (run F: 0.8795 vs 0.8770 with the head at 1e-4)


@dataclass(frozen=True)
class Default:
    key: str  # dotted config key
    value: Any
    why: str  # the measurement or the citation behind the value


def model_kind_and_size(name: str) -> tuple[str | None, int | None]:
    """("encoder" | "causal" | None, parameters or None) from the embedded table or a folder's
    config.json, estimated from its shape (embeddings + 4h^2 attention + MLP per layer). A hub id
    (nothing on disk to read) is (None, None): the generic defaults apply."""
    if name in EMBEDDED_SIZES:
        return EMBEDDED_SIZES[name]
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        return "causal", None
    try:
        c = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, None
    if not isinstance(c, dict):
        return None, None
    archs = " ".join(c.get("architectures") or [])
    model_type = str(c.get("model_type", ""))
    kind = "encoder" if is_encoder(model_type) else (
        "causal" if "CausalLM" in archs or "LMHead" in archs or c.get("is_decoder") else None)
    try:
        h = int(c.get("hidden_size") or c.get("n_embd") or c.get("d_model"))
        layers = int(c.get("num_hidden_layers") or c.get("n_layer") or c.get("num_layers"))
        inter = int(c.get("intermediate_size") or c.get("n_inner") or 4 * h)
        vocab = int(c.get("vocab_size") or 0)
    except (TypeError, ValueError):
        return kind, None
    gated = gated_mlp(model_type, c.get("hidden_act") or c.get("activation_function"))
    return kind, vocab * h + layers * (4 * h * h + (3 if gated else 2) * h * inter)


def _size_words(n: int | None) -> str:
    return "size unknown" if n is None else f"{n / 1e6:.0f}M parameters"


def learning_rate(task: str, method: str, kind: str | None, n: int | None) -> Default:
    """optim.lr for this task, method and model; the why says where the value comes from."""
    size = _size_words(n)
    if method == "feature_extraction":
        return Default("optim.lr", 1e-3, "only the new head trains (a linear probe on frozen features): Adam's own "
                       "default 1e-3 (Kingma & Ba 2015); the head multiplier is 1 with it")
    if task == "classification":
        if method in ("lora", "qlora") and n is not None and n < 60e6:
            return Default("optim.lr", 1e-3, f"LoRA on a small encoder classifier ({size}): MiniLM on SST-2, LoRA r=8 "
                           "at 1e-3 (head x20) 0.846 vs full fine-tuning at 1e-4 0.843 "
                           "(benchmarks/results/lora_vs_full_sst2.json)")
        if method in ("lora", "qlora"):
            return Default("optim.lr", 5e-4, f"LoRA on an encoder classifier ({size}): Hu et al. 2021 (LoRA, "
                           "Table 9) fine-tuned RoBERTa-base on SST-2 at 5e-4; an adapter starts at zero and needs "
                           "~10x the full fine-tuning lr")
        if n is not None and n < 60e6:
            return Default("optim.lr", SMALL_ENCODER_LR, f"small encoder ({size}): {SMALL_ENCODER_WHY}")
        if n is not None and n > 250e6:
            return Default("optim.lr", 1e-5, f"large encoder ({size}): RoBERTa-large / BERT-large fine-tune at 1e-5 "
                           "(Liu et al. 2019, Table 10); higher rates fail on some seeds (Mosbach et al. 2021)")
        return Default("optim.lr", 2e-5, f"base-size encoder ({size}): 2e-5, the BERT/RoBERTa-base GLUE value "
                       "(Devlin et al. 2019 grid 5e-5..2e-5; Mosbach et al. 2021)")
    if method in ("lora", "qlora"):
        return Default("optim.lr", 2e-4, f"LoRA/QLoRA on a causal LM ({size}): 2e-4 (Dettmers et al. 2023, QLoRA, "
                       "for models up to 13B)")
    if n is not None and n < 500e6:
        return Default("optim.lr", 5e-5, f"full fine-tuning of a small causal LM ({size}): SmolLM2-135M-Instruct chat "
                       "SFT at 5e-5 lowered the held-out loss 1.759 -> 1.668 in 10 steps "
                       "(benchmarks/results/sft_alpaca.json); SmolLM2's own SFT from the base used 1e-3 at 128 x "
                       "8192-token batches (alignment-handbook recipes/smollm2/sft/config_smol.yaml), far from a "
                       "small batch on an already-tuned model")
    return Default("optim.lr", 2e-5, f"full fine-tuning of a causal LM ({size}): 2e-5 (Zephyr/Tulu SFT on 7B, "
                   "alignment-handbook recipes/zephyr-7b-beta)")


def _effective_lr(cfg, default: float) -> float:
    """The lr the run will use: the user's (a number; 'auto' counts as the default) or the default."""
    lr = cfg.optim.lr if "lr" in cfg.optim.model_fields_set or cfg.versions is not None else default
    return lr if isinstance(lr, (int, float)) else default


# chat / causal LM / preference: the field's 128 (an encoder classifier's sentence) cuts most answers. Measured on
# alpaca_eval's GPT-4 answers with SmolLM2's tokenizer: prompt median 52 / p90 105 tokens, answer median 308 / p90
# 567, so at 128 nearly every answer loses its end (7 of 8 in a sample of 8).
# 1024 is TRL's SFTConfig and DPOConfig default; training clamps it to the model's positions (train.sizes).
LM_MAX_LENGTH = Default("model.max_length", 1024, "chat / causal LM / preference: 1024, TRL's SFTConfig and DPOConfig "
                        "default, clamped to the model's max_position_embeddings; the field's 128 cut nearly every "
                        "alpaca_eval answer (SmolLM2 tokens: answer median 308, p90 567)")


def recipe_for(cfg) -> list[Default]:
    """Every default this config's task, method and model get, in config order."""
    if cfg.task == "preference":  # lr not measured here (DPO wants ~1e-6, Rafailov et al. 2023): the field's own
        return [LM_MAX_LENGTH]
    kind, n = model_kind_and_size(cfg.model.name)
    lm = cfg.task != "classification"
    out = ([LM_MAX_LENGTH] if lm else []) + [learning_rate(cfg.task, cfg.method, kind, n)]
    if cfg.task == "classification" and cfg.method == "feature_extraction":
        out.append(Default("optim.head_lr_multiplier", 1.0, "feature extraction: the head is all that trains; "
                           "optim.lr is its rate"))
    elif cfg.task == "classification" and cfg.method == "full" and _effective_lr(cfg, out[0].value) >= 1e-4:
        lr = _effective_lr(cfg, out[0].value)
        out.append(Default("optim.head_lr_multiplier", max(1.0, round(HEAD_LR / lr, 6)),
                           f"the new head at {HEAD_LR:g} (lr x {max(1.0, HEAD_LR / lr):g}): with the body at 1e-4 a "
                           "head at 1e-3 gave 0.8795 vs 0.8770 at 1e-4 on SST-2 (benchmarks/README.md, runs F, B); at "
                           "a body lr of 2e-5 the measured best was x20 (4e-4, run C), the field's default"))
    out.append(Default("schedule.warmup_ratio", 0.03 if lm else 0.06,
                       "3% warmup, as QLoRA / Alpaca SFT (Dettmers et al. 2023)" if lm else
                       "6% warmup, RoBERTa's GLUE recipe (Liu et al. 2019)"))
    if cfg.task == "classification" and cfg.data.eval is None:
        out.append(Default("checkpoint.final", "last", "the eval rows are a split of the training file: they flatter "
                           "(same distribution, a few hundred rows). On SST-2 the split said 0.8625 and picked epoch 1, "
                           "which scored 0.80 on an independent sentence-level test (the Trainer's last epoch at the "
                           "same lr: 0.825), and dev accuracy still rose at epoch 3 in every measured recipe "
                           "(benchmarks/README.md runs A-F); with a cosine schedule to 0 the last step is the safer "
                           "pick. Give data.eval to select on your own file"))
    return out


def default_lr(cfg) -> float:
    """The optim.lr this config gets when it does not say one (the number behind `optim.lr: auto` until the
    range test replaces it): `recipe_for`'s, else the field's own default (task preference)."""
    for d in recipe_for(cfg):
        if d.key == "optim.lr":
            return d.value
    return type(cfg.optim).model_fields["lr"].default


def _set(cfg, key: str, value) -> bool:
    """Set `key` unless the user set it (or a run dir's config.yaml spelled it out); True when set."""
    section_name, field = key.split(".")
    section = getattr(cfg, section_name)
    if cfg.versions is not None or field in section.model_fields_set:
        return False
    if key == "schedule.warmup_ratio" and "warmup_steps" in section.model_fields_set:
        return False
    if key == "optim.head_lr_multiplier" and "head_lr" in section.model_fields_set:
        return False
    setattr(section, field, value)
    section.__pydantic_fields_set__.discard(field)  # still "not set by the user": plan's variants re-resolve
    return True


def apply_defaults(cfg):
    """Fill the unset keys with this config's defaults (in place, once) and return the config."""
    if getattr(cfg, "_defaults", None) is not None:
        return cfg
    chosen = {}
    for d in recipe_for(cfg):
        if _set(cfg, d.key, d.value):
            chosen[d.key] = {"value": d.value, "why": d.why}
    cfg._defaults = chosen
    return cfg


def resolved_defaults(cfg) -> dict:
    """What apply_defaults chose for this config: {key: {value, why}} ({} before it ran or for a resume)."""
    return dict(getattr(cfg, "_defaults", None) or {})


def default_lines(chosen: dict) -> list[str]:
    """`tunelab plan`'s lines for the defaults it chose (the first clause of each reason)."""
    if not chosen:
        return []
    return ["defaults (keys the config left unset):"] + [
        f"  {k}: {v['value']} - {v['why'].split(':')[0] if len(v['why']) > 90 else v['why']}" for k, v in chosen.items()]


def eval_trust(data_cfg, info: dict, final: dict | None) -> dict | None:
    """How far to trust the evaluation that picked final/ (summary.json `eval_trust`, the report);
    `data_cfg`: the config's data section (eval, eval_split).

    The 95% interval of an accuracy on n rows is Wilson's score interval (the normal approximation
    +-1.96 sqrt(p(1-p)/n) says +-0 at p = 1, which the demo's 120 rows hit; Wilson's stays honest at
    the ends); a split of the training file also shares its distribution, so it reads higher than new
    data would (SST-2: the split said 0.8625 where an independent test gave 0.80)."""
    rows = info.get("eval_rows") or info.get("eval_units")
    if not rows:
        return None
    split = data_cfg.eval is None
    out = {"source": f"{data_cfg.eval_split:.0%} split of the training file" if split else "data.eval",
           "rows": rows, "same_distribution_as_training": True if split else None}
    acc = (final or {}).get("accuracy")
    if isinstance(acc, (int, float)) and 0 <= acc <= 1:
        z2 = 1.96 ** 2 / rows
        centre = (acc + z2 / 2) / (1 + z2)
        half = 1.96 * math.sqrt(acc * (1 - acc) / rows + z2 / (4 * rows)) / (1 + z2)
        out["accuracy_95ci"] = round(half, 4)
        out["accuracy_95_interval"] = [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]
    small = rows < 1000
    if split and small:
        out["trust"] = "low"
    elif split or small:
        out["trust"] = "moderate"
    else:
        out["trust"] = "fair"
    parts = [f"the evaluation has {rows} rows"]
    if "accuracy_95ci" in out:
        lo, hi = out["accuracy_95_interval"]
        parts.append(f"its accuracy {acc:.3f} means {lo:.3f}-{hi:.3f} (95% interval)")
    if split:
        parts.append("they are a split of the training file, so new data will likely score lower; measure final/ on "
                     "a separate test file (`tunelab eval RUN/final TEST`) before relying on the number")
    out["message"] = "; ".join(parts)
    return out
