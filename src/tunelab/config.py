"""Typed configuration: pydantic models for the YAML, loaded with exact error locations.

Each section maps one to one onto the arguments of the function it configures. Unknown keys are
errors; cross-field rules are checked at load time and the message says the fix. Errors name the
YAML file, the line of the offending key and its dotted path, so `tunelab train` can print one
line and exit 2.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, PrivateAttr, Tag, ValidationError, field_validator,
                      model_validator)

from tunelab.errors import InputError


class RuleError(ValueError):
    """A broken cross-field rule; `field` (dotted, relative to the model that checks the rule) names
    the key to change, so the error points at that key's line."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _numeric(annotation) -> bool:
    """Whether a field's type takes numbers (int, float, a tuple of them, or one of those or None)."""
    if annotation in (int, float):
        return True
    args = [a for a in get_args(annotation) if a is not type(None) and get_origin(a) is not Literal]  # lr: auto
    return bool(args) and all(_numeric(a) for a in args)


class Section(BaseModel):
    # NaN and inf are never meant: `lr: .nan` or `eps: .inf` must stop at load time, not mid-run.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _booleans_are_not_numbers(cls, data: Any) -> Any:
        """Strict numbers: YAML 1.1 reads `on`, `yes`, `true` as booleans, and pydantic would take
        them as 1 (`lr: on` trains at lr 1.0); a boolean where a number belongs is refused."""
        if not isinstance(data, dict):
            return data
        for name, value in data.items():
            field = cls.model_fields.get(name) if isinstance(name, str) else None
            if field is None or not _numeric(field.annotation):
                continue
            values = value if isinstance(value, (list, tuple)) else [value]
            if any(isinstance(v, bool) for v in values):
                raise RuleError(name, f"expects a number, got the boolean {value!r} (YAML reads on/off/yes/no/true/false "
                                      "as booleans); write the number")
        return data


class ModelConfig(Section):
    name: str = Field(
        "minilm",
        description="Embedded name (minilm, smollm2-135m-instruct), a local HF folder, or a hub id.",
    )
    max_length: int = Field(128, gt=0, le=1_000_000)
    trust_remote_code: bool = False
    revision: str | None = None
    allow_pickle: bool = Field(False, description="Load .bin/.pt pickle weights (with weights_only) when a folder has "
                               "no safetensors; off: pickles can run code, so they are refused.")


class DataSource(Section):
    """One source of a weighted mix: data.train (or data.eval) given as a list of these (every task)."""

    path: str = Field(min_length=1)
    weight: float = Field(1.0, gt=0, le=1_000_000, description="Share of each epoch: weight / sum of the weights; an "
                          "epoch is one pass over the first source (data/mixing.py).")
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="The source's name in summary.json "
                             "and in its eval_<name>_loss; default the file's stem.")
    format: Literal["auto", "csv", "tsv", "jsonl", "json", "parquet", "openai", "sharegpt", "alpaca",
                    "prompt_completion", "text", "txt", "preference"] = Field(
        "auto", description="This source's file format (classification) or record format (chat, causal_lm, "
        "preference); auto: data.format.")

    def label(self) -> str:
        return self.name or Path(self.path).stem


# what data.format (and a source's format) may be, per task: one table for the data section's rule and
# the sources' (Config._cross_field, _preference_rules, _source_rules); auto is always allowed
FILE_FORMATS = ("csv", "tsv", "jsonl", "json", "parquet")  # classification reads files of these types
RECORD_FORMATS = ("openai", "sharegpt", "alpaca", "prompt_completion", "text", "txt")  # chat / causal_lm records
TASK_FORMATS = {"classification": FILE_FORMATS, "preference": ("preference",), "chat": RECORD_FORMATS,
                "causal_lm": RECORD_FORMATS}


def _file_or_sources(value) -> str:
    return "[sources]" if isinstance(value, list) else "[file]"


# a file, or a list of sources: the shape picks the branch, so an error names what is wrong in that shape
# (the tags are bracketed so that _is_type_tag keeps them out of the field name)
FileOrSources = Annotated[Union[Annotated[str, Field(min_length=1), Tag("[file]")],
                                Annotated[list[DataSource], Field(min_length=1), Tag("[sources]")]],
                          Discriminator(_file_or_sources)]


class DataConfig(Section):
    train: FileOrSources = Field(description="A data file (or dataset: a save_to_disk folder, hf:ORG/NAME), or a "
                                 "list of sources [{path, weight, name, format}] mixed by weight in each epoch.")
    eval: FileOrSources | None = Field(None, description="An eval file, or a list of sources: each one's loss (and "
                                       "accuracy, preference accuracy) is reported as eval_<name>_*, beside eval_loss "
                                       "over all.")
    mix_sampling: Literal["without_replacement", "with_replacement"] = Field(
        "without_replacement", description="How a list of training sources is drawn each epoch: exact shares from "
        "each source's shuffled order, cycling (without), or each row's source drawn by weight (with).")
    eval_split: float = Field(0.1, ge=0.0, lt=1.0, description="Share of train held out when no eval file is given.")
    format: Literal["auto", "csv", "tsv", "jsonl", "json", "parquet",
                    "openai", "sharegpt", "alpaca", "prompt_completion", "text", "txt", "preference"] = Field(
        "auto", description="File format (classification) or record format (chat, causal_lm); auto detects it.")
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    labels: list[str] | None = Field(None, min_length=2, description="Allowed label names, in id order; inferred when absent.")
    max_rows: int | None = Field(None, gt=0)
    header: bool | None = Field(None, description="CSV/TSV: whether the first row names the columns; unset: detected "
                                "(a first row naming none of the columns, whose last field recurs as a label below, is "
                                "data). Without a header the columns are text[, text pair], label, in that order.")

    @field_validator("labels")
    @classmethod
    def _labels_once(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and len(set(v)) != len(v):
            raise ValueError(f"a label name appears twice: {sorted({n for n in v if v.count(n) > 1})}")
        # a data file's labels are read stripped and a blank one is refused: no row could hold such a class
        odd = next((n for n in v or () if not n.strip() or n != n.strip()), None)
        if odd is not None:
            raise ValueError("a label name is blank" if not odd.strip() else
                             f"label name {odd!r} starts or ends with spaces; the labels in the data are read without them")
        return v
    overflow: Literal["truncate", "drop"] = Field(
        "truncate", description="chat/causal_lm: what to do with an example longer than model.max_length.")
    packing: bool | None = Field(
        None, description="chat/causal_lm: pack several examples into one row (default true); not for classification.")
    cache: bool = Field(True, description="Keep the encoded data in the data cache ($TUNELAB_DATA_CACHE, else "
                        "$TUNELAB_CACHE/encoded): later runs, resumes, plan and every rank read it instead of "
                        "tokenizing again (`tunelab cache ls|clear`).")
    num_proc: int = Field(1, ge=1, le=256, description="Worker processes encoding the data the first time (chunks of "
                          "records, batched fast-tokenizer calls); the result does not depend on it.")


class OptimConfig(Section):
    name: Literal["adamw", "adamw_8bit"] = Field(
        "adamw", description="adamw: torch's AdamW, fp32 moments (the exact path); adamw_8bit: AdamW with both "
        "moments in 8 bits, block-wise quantised (Dettmers et al. 2022; bitsandbytes' AdamW8bit, its CPU kernel "
        "run in 1M-value slices: train/optim.py), 2 instead of 8 bytes a parameter. SmolLM2-135M full fine-tune, fp32, "
        "4 x 512 tokens, 4 steps (benchmarks/optim_memory.py): optimizer state 1026 -> 261 MB, peak RSS 4742 -> "
        "4015 MB with MALLOC_MMAP_THRESHOLD_=131072 (5548 -> 5213 MB with glibc's default threshold), the "
        "optimizer step ~2.2 s instead of ~0.2 s, losses within 0.004%. Off by default: it is not the exact path.")
    lr: float | Literal["auto"] = Field(2e-5, description="The base learning rate; default per model family, size "
                                        "and method (tunelab/defaults.py); auto: a learning-rate range test on the "
                                        "model and data picks it (train/lr_find.py, `tunelab lr-find`).")
    weight_decay: float = Field(0.01, ge=0, le=10)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    head_lr: float | None = Field(None, gt=0, le=10, description="lr of the newly initialised head; default lr x head_lr_multiplier.")
    # SST-2 4000 rows x 3 ep, lr 2e-5, dev 2000 rows: x20 + batch 8 0.8705 vs x1 + batch 16 0.8585 (benchmarks/README.md)
    head_lr_multiplier: float = Field(20.0, gt=0, le=10_000, description="head lr = lr x this for the newly initialised "
                                      "classification head; chat/causal_lm default to 1 (their lm_head is pre-trained).")
    layer_lr_decay: float = Field(1.0, gt=0, le=1, description="ULMFiT-style factor per block below the top; 1 = off.")

    @field_validator("lr")
    @classmethod
    def _lr_in_range(cls, v):
        if v != "auto" and not 0 < v <= 10:
            raise ValueError("must be > 0 and <= 10 (or auto)")
        return v

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError("each beta must be in [0, 1)")
        return v


class ScheduleConfig(Section):
    name: Literal["constant", "linear", "cosine", "wsd"] = "cosine"
    warmup_ratio: float | None = Field(0.06, ge=0, lt=1)
    warmup_steps: int | None = Field(None, ge=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    decay_ratio: float = Field(0.1, gt=0, le=1, description="WSD: share of the steps spent in the final decay.")

    @model_validator(mode="after")
    def _one_warmup(self) -> "ScheduleConfig":
        if {"warmup_steps", "warmup_ratio"} <= self.model_fields_set and None not in (self.warmup_steps, self.warmup_ratio):
            raise ValueError("set schedule.warmup_steps or schedule.warmup_ratio, not both")
        return self


class TrainConfig(Section):
    epochs: float = Field(3, gt=0, le=10_000)
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps; overrides epochs.")
    # SST-2 4000 rows x 3 ep, lr 2e-5, head x20: batch 8 0.8705 vs batch 16 0.8630 dev acc (benchmarks/README.md)
    batch_size: int = Field(8, gt=0, le=65_536, description="Examples per micro-batch (per optimizer step with grad_accum 1).")
    grad_accum: int = Field(1, gt=0, le=65_536)
    max_grad_norm: float | None = Field(1.0, gt=0)
    seed: int = Field(42, ge=0, le=2**32 - 1, description="0 .. 2**32 - 1 (what every RNG of the run accepts).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "fp32"
    weights_dtype: Literal["fp32", "bf16"] = Field(
        "fp32", description="fp32: fp32 weights and gradients, bf16 only inside autocast (the exact path); bf16: the "
        "weights and gradients themselves in bf16, AdamW's moments in fp32, each update rounded stochastically into "
        "the bf16 weight (train/bf16_adamw.py): 4 bytes a parameter less and no per-step weight copies; with optim.name "
        "adamw_8bit the moments are 8-bit and the update is rounded the same way. Implies train.precision bf16. "
        "Single process or ddp; method full, freeze or lora.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward. MiniLM, batch 32x256 on CPU: peak memory 4.3 -> 2.3 GB, step time 1.7x (benchmarks/results/grad_checkpointing_memory.json).")
    log_every: int = Field(10, gt=0)
    eval_every: int | None = Field(None, gt=0, description="Optimizer steps between evaluations; default once per epoch.")
    eval_before: bool = Field(True, description="Evaluate the untouched model first, for a before/after comparison.")
    eval_batch_size: int | None = Field(None, gt=0)
    auto_batch: bool = Field(False, description="On out-of-memory: halve batch_size, double grad_accum (same effective "
                             "batch) and continue from the newest checkpoint.")
    packed_attention: Literal["split", "mask"] = Field(
        "mask", description="chat/causal_lm with data.packing: mask = the block-diagonal (1, 1, L, L) mask per row; "
        "split = each packed example its own causal sdpa call, no mask (models/packed_attention.py). Same logits "
        "(tested); at 512-token rows on CPU split measured slower for ~3 MB less per layer; for long rows.")
    loss_chunk_tokens: int = Field(
        256, ge=0, le=1_000_000, description="chat/causal_lm: the vocabulary projection and cross-entropy this many "
        "supervised tokens at a time, gradients taken in the forward (train/chunked_loss.py); preference: its answer "
        "log-probs so (recomputed in backward when the head trains); 0 = all at once. Same loss and gradients "
        "(tested), without the full fp32 logits.")
    recompute_norms: bool = Field(
        True, description="chat/causal_lm: recompute RMSNorms in backward instead of keeping their fp32 insides "
        "(models/recompute.py; bit-identical, ~18 MB per SmolLM2 layer at 4 x 512 tokens); moot with "
        "gradient_checkpointing.")
    recompute_mlp_activation: bool = Field(
        True, description="chat/causal_lm: recompute a gated MLP's act(gate) * up in backward instead of keeping "
        "act(gate) (models/recompute.py; bit-identical, SmolLM2-135M at 4 x 512 tokens: ~187 MB); moot with "
        "gradient_checkpointing.")
    malloc_mmap_threshold: int | None = Field(
        None, ge=0, le=32 * 2**20, description="Bytes: fix glibc malloc's mmap threshold at this size for the run's "
        "process, so freed activations go back to the OS instead of staying as fragmented heap "
        "(tunelab/host_malloc.py); null = glibc's own dynamic threshold. The environment's MALLOC_MMAP_THRESHOLD_ "
        "wins. No effect on the numbers. Measured (benchmarks/results/malloc_threshold.json, SmolLM2-135M full, fp32, "
        "4 x 512 tokens, 2 runs a side): peak RSS 5557 -> 4690 MB at 131072 (4993 at 4 MiB), but 14.8 -> 20.4 s a step "
        "(18.3 at 4 MiB): every large tensor is a fresh mmap the kernel zeroes. Off by default for the speed; set it "
        "when memory is what binds. Under tcmalloc or jemalloc (train.host_allocator) it has no effect.")
    host_allocator: Literal["auto", "glibc", "jemalloc", "tcmalloc"] = Field(
        "auto", description="The malloc `tunelab train` runs on (tunelab/host_allocator.py): the command re-executes "
        "itself with LD_PRELOAD when the one named is not loaded; auto = tcmalloc where the machine has it "
        "(Debian/Ubuntu libtcmalloc-minimal4), else jemalloc (libjemalloc2), else glibc. No effect on the numbers. "
        "Measured (benchmarks/results/host_allocator.json, SmolLM2-135M full, bf16 weights + 8-bit moments, 2 runs "
        "each): train peak RSS / tokens/s glibc 3744 MB / 313, jemalloc 3168 / 327, tcmalloc 3108 / 366. The Python API runs on its process's allocator.")


class CheckpointConfig(Section):
    save_every: int | None = Field(None, gt=0, description="Optimizer steps between checkpoints; default at every evaluation.")
    keep_last: int = Field(1, ge=1, le=1000)
    metric: str | None = Field(None, description="Eval metric that picks the best checkpoint; default per task.")
    mode: Literal["max", "min"] | None = None
    min_delta: float = Field(0.001, ge=0)
    final: Literal["best", "last", "best_or_base"] = Field(
        "best", description="What final/ holds: best (the best evaluated checkpoint), last (the last step), "
        "best_or_base (the best checkpoint, or the untouched base model when no evaluation beat the one before training).")


class EarlyStoppingConfig(Section):
    enabled: bool = True
    patience: int = Field(3, gt=0, le=1_000_000)


class FreezeConfig(Section):
    """method: freeze — which pre-trained parts get no gradient and no optimizer state."""

    embeddings: bool = False
    blocks: int = Field(0, ge=0, le=10_000, description="Freeze the first N transformer blocks.")
    all_but_head: bool = Field(False, description="Train only the new head (the backbone still runs in train mode).")


class FeatureExtractionConfig(Section):
    """method: feature_extraction — frozen backbone in inference mode, a new head on pooled features."""

    pooling: Literal["native"] = Field("native", description="The model's own pooled input to its head (BERT: pooler over [CLS]).")
    cache_features: bool = Field(True, description="Run the backbone once; later epochs cost only the head.")


class UnfreezeConfig(Section):
    """Gradual unfreezing (ULMFiT): start with the head, unfreeze one more block from the top every N units."""

    every: int | None = Field(None, gt=0)
    unit: Literal["epochs", "steps"] = "epochs"


class LoraConfig(Section):
    """method: lora / qlora (through peft)."""

    r: int = Field(8, gt=0, le=4096)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    lean_dropout: bool = Field(
        True, description="Fold the dropout into lora_A so backward keeps a bit-packed mask instead of peft's fp32 "
        "noise and the dropped copy (models/lora_dropout.py): the same masks and numbers as peft's layer, "
        "SmolLM2-135M LoRA at 4 x 512 tokens saves ~1.1 GB of activations. Vanilla LoRA/QLoRA (not DoRA); "
        "false = peft's own dropout.")
    recompute_inputs: bool = Field(
        True, description="With lean_dropout: an adapted projection whose input is a recomputed norm's output or the "
        "gated MLP's product (train.recompute_norms, recompute_mlp_activation) makes that input again in backward "
        "instead of keeping it (models/recompute.py; bit-identical, SmolLM2-135M LoRA at 4 x 512 tokens: ~447 MB "
        "fewer saved activations, for one norm and one SiLU and multiply a layer again); not under zero3.")
    base_dtype: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="The frozen base's Linear weights (models/frozen_weights.py). bf16: stored in bf16, what "
        "bf16 autocast casts them to on every call anyway: no per-step copies, half the bytes (SmolLM2-135M LoRA at "
        "4 x 512 tokens: ~420 MB less), bit-identical losses and gradients; a forward outside autocast (forgetting "
        "probe, generation measures) sees the bf16-rounded weights, before and after alike. Under qlora the 4-bit "
        "layers also keep autocast's bf16 output instead of bitsandbytes' upcast to fp32 (models/autocast_4bit.py; "
        "the numbers of LoRA on the dequantised base, ~540 MB fewer saved activations). Needs bf16 precision, "
        "strategy ddp, no DoRA. auto: bf16 wherever that holds, else fp32.")
    target_modules: list[str] | Literal["auto", "all-linear"] = "auto"
    rslora: bool = False
    dora: bool = False
    merge: bool = Field(False, description="Also write final/merged/: the base with the adapter folded in (a plain HF model).")

    @field_validator("target_modules")
    @classmethod
    def _some_modules(cls, v):
        if isinstance(v, list) and (not v or not all(m.strip() for m in v)):
            raise ValueError("needs at least one module name (or auto / all-linear)")
        return v


class RegularizationConfig(Section):
    """Guards against catastrophic forgetting; all off by default."""

    l2sp: float = Field(0.0, ge=0, description="L2-SP weight: the penalty is l2sp / 2 * sum((w - w0)^2), toward the "
                         "pre-trained weights w0.")
    ewc: float = Field(0.0, ge=0, description="EWC weight: the penalty is ewc / 2 * sum(F * (w - w0)^2), F the diagonal "
                        "empirical Fisher (mean per-example squared gradient at w0).")
    ewc_data: str | None = Field(None, description="Reference data for the Fisher; default the training data.")
    ewc_batches: int = Field(16, gt=0, le=100_000)
    mixout: float = Field(0.0, ge=0, lt=1, description="Mixout probability p: swap fine-tuned weights for pre-trained ones, rescaled.")
    replay_data: str | None = Field(None, description="General/replay data mixed into each epoch (same task format).")
    replay_ratio: float = Field(0.0, ge=0, lt=1, description="Share of each epoch's examples drawn from replay_data.")


class ProbeConfig(Section):
    """Forgetting probe: a reference data set evaluated before and after fine-tuning."""

    data: str | None = None
    max_rows: int = Field(512, gt=0)
    warn_loss_increase: float = Field(0.25, ge=0, description="Flag a relative loss increase above this share.")
    min_cosine: float = Field(0.9, ge=0, le=1, description="Flag a mean embedding cosine (before vs after) below this; "
                              "benchmarks/results/forgetting_sst2.json: 0.82 at a too-high lr, 0.99 at the default.")
    generate_n: int = Field(8, ge=0, le=10_000, description="chat/causal_lm: also answer the first N probe prompts "
                            "before and after, with the eval.generate measures (0 = off): what general ability was lost.")


class GenerateEvalConfig(Section):
    """chat/causal_lm: generation measures (evaluate/generation.py) on N prompts, greedy and sampled,
    for the untouched model first, then at each evaluation (every: eval) or at the end only."""

    prompts: str | None = Field(None, description="A prompts file (records with 'prompt', or any chat/text data file); "
                                "default the eval data's prompts (the turns before each last assistant turn).")
    n: int = Field(16, ge=0, le=10_000, description="Prompts to generate for; 0 = off.")
    max_new_tokens: int = Field(64, gt=0, le=100_000)
    temperature: float = Field(0.7, gt=0, le=10, description="The sampled replies' temperature (greedy ones are made too).")
    seed: int = 0
    batch_size: int = Field(8, gt=0, le=4096, description="Prompts generated together (left-padded).")
    every: Literal["eval", "end"] = Field("end", description="eval: at every evaluation too; end: before and after only.")


class PreferenceConfig(Section):
    """task: preference — the loss on (prompt, chosen, rejected) pairs; defaults from each loss's paper
    (train/preference_losses.py cites them)."""

    loss: Literal["dpo", "ipo", "orpo", "simpo"] = "dpo"
    beta: float | None = Field(None, gt=0, le=1000, description="DPO/IPO beta (IPO's tau), SimPO's beta; default the "
                               "paper's: dpo 0.1, ipo 0.1, simpo 2.0. ORPO has lambda instead (orpo_lambda).")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="dpo: conservative DPO's label-noise eps (Mitchell "
                                   "2023); 0 = plain DPO.")
    orpo_lambda: float = Field(0.1, gt=0, le=1000, description="orpo: weight of the odds-ratio term (Hong et al. 2024: 0.1).")
    simpo_gamma: float = Field(1.0, ge=0, le=1000, description="simpo: target reward margin (Meng et al. 2024: 1.0 "
                               "with beta 2.0).")
    max_prompt_length: int | None = Field(None, gt=0, le=1_000_000, description="Prompt tokens kept (its end) when a "
                                          "pair exceeds model.max_length; default max_length // 2.")

    @model_validator(mode="after")
    def _parameters_of_the_loss(self) -> "PreferenceConfig":
        given = self.model_fields_set
        for key, losses in (("label_smoothing", ("dpo",)), ("orpo_lambda", ("orpo",)), ("simpo_gamma", ("simpo",)),
                            ("beta", ("dpo", "ipo", "simpo"))):
            default = type(self).model_fields[key].default
            if key in given and getattr(self, key) != default and self.loss not in losses:
                raise RuleError(key, f"preference.{key} applies to loss {' / '.join(losses)}, not '{self.loss}': "
                                "remove it" + (" (ORPO's weight is preference.orpo_lambda)" if key == "beta" else ""))
        return self


class EvalConfig(Section):
    generate: GenerateEvalConfig = GenerateEvalConfig()


class MonitorConfig(Section):
    """Where metrics go besides metrics.jsonl, and the live health checks. Credentials stay in the
    environment (WANDB_API_KEY, MLFLOW_TRACKING_URI / MLFLOW_TRACKING_TOKEN); none belongs here."""

    loggers: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        [], description="Also log to these: tensorboard (RUN/tensorboard/), wandb, mlflow (each needs its package).")
    project: str | None = Field(None, description="W&B project / MLflow experiment; default 'tunelab'.")
    run_name: str | None = Field(None, description="W&B / MLflow run name; default the run dir's name.")
    health: bool = Field(True, description="Watch the rows for loss spikes, exploding gradients, plateaus, overfitting "
                         "and lr trouble; warn, and record them in metrics.jsonl, summary.json and report.html.")
    loggers_required: bool = Field(False, description="A logger that cannot start is an input error (exit 2) "
                                   "instead of a warning and a 'failed' entry in summary.json's loggers.")


class DistributedConfig(Section):
    """How several processes (`tunelab train --nproc N`, N > 1) share the model (README: which strategy when).
    Alone, none of this applies."""

    strategy: Literal["ddp", "fsdp", "zero1", "zero2", "zero3"] = Field(
        "ddp", description="ddp: a full copy per process (torch DDP); fsdp: parameters, gradients and optimizer "
        "state sharded per transformer block (torch FSDP2); zero1/zero2/zero3: DeepSpeed ZeRO sharding the "
        "optimizer state / also the gradients / also the parameters.")
    cpu_offload: bool = Field(False, description="fsdp, zero*: keep the sharded optimizer state (and under "
                              "fsdp/zero3 the parameters) in host memory.")
    reshard_after_forward: bool = Field(True, description="fsdp: free each block's gathered parameters after its "
                                        "forward (gather again for backward); false keeps them: faster, more memory.")

    @model_validator(mode="after")
    def _options_of_the_strategy(self) -> "DistributedConfig":
        if self.cpu_offload and self.strategy == "ddp":
            raise RuleError("cpu_offload", "distributed.cpu_offload needs a sharded strategy (ddp keeps everything "
                            "on each device): set distributed.strategy fsdp, zero1, zero2 or zero3, or remove it")
        if not self.reshard_after_forward and self.strategy != "fsdp":
            raise RuleError("reshard_after_forward", "distributed.reshard_after_forward applies to strategy fsdp "
                            f"only, not '{self.strategy}': remove it")
        return self


class Config(Section):
    task: Literal["classification", "causal_lm", "chat", "preference"] = "classification"
    model: ModelConfig = ModelConfig()
    data: DataConfig
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    early_stopping: EarlyStoppingConfig = EarlyStoppingConfig()
    method: Literal["full", "freeze", "feature_extraction", "lora", "qlora"] = "full"
    freeze: FreezeConfig = FreezeConfig()
    feature_extraction: FeatureExtractionConfig = FeatureExtractionConfig()
    unfreeze: UnfreezeConfig = UnfreezeConfig()
    lora: LoraConfig = LoraConfig()
    regularization: RegularizationConfig = RegularizationConfig()
    probe: ProbeConfig = ProbeConfig()
    eval: EvalConfig = EvalConfig()
    preference: PreferenceConfig = PreferenceConfig()
    monitor: MonitorConfig = MonitorConfig()
    distributed: DistributedConfig = DistributedConfig()
    versions: dict[str, str] | None = Field(None, description="Written into the run dir by tunelab; ignored on load.")
    _defaults: dict | None = PrivateAttr(None)  # what tunelab.defaults filled in (key -> value, why); None: not yet

    @model_validator(mode="after")
    def _cross_field(self) -> "Config":
        self._preference_rules()
        if self.task == "classification":
            if self.data.packing:
                raise RuleError("data.packing", "data.packing applies to chat and causal_lm only: remove it for classification")
            if self.data.format in RECORD_FORMATS:
                raise RuleError("data.format", f"data.format '{self.data.format}' is a chat/causal_lm format; "
                                 f"for classification use auto, {', '.join(FILE_FORMATS)}")
            if self.eval.generate != GenerateEvalConfig():  # a resolved config.yaml spells out the defaults: fine
                raise RuleError("eval.generate", "eval.generate measures generated replies: it applies to chat and "
                                "causal_lm only; remove it for classification")
        else:
            if self.data.format in FILE_FORMATS:
                raise RuleError("data.format", f"data.format '{self.data.format}' is a file type; for {self.task} give the "
                                 f"record format (auto, {', '.join(RECORD_FORMATS)})")
            if self.data.packing is None:
                self.data.packing = True
            if "head_lr_multiplier" not in self.optim.model_fields_set:
                self.optim.head_lr_multiplier = 1.0  # an LM's lm_head is pre-trained, not a new head
        self._conflicts()
        self._source_rules()
        if self.unfreeze.every and self.method not in ("full",):
            raise RuleError("unfreeze.every", f"gradual unfreezing decides what trains itself; it cannot be combined "
                            f"with method '{self.method}' (use method: full, or remove unfreeze)")
        if self.data.eval is None and self.data.eval_split == 0 and self.early_stopping.enabled:
            raise RuleError(
                "early_stopping.enabled",
                "early stopping needs evaluation: set data.eval, or data.eval_split > 0, "
                "or early_stopping.enabled: false"
            )
        return self

    def _preference_rules(self) -> None:
        """task: preference pads pairs (no packing) and reads prompt/chosen/rejected records; its
        section and its record format belong to it alone."""
        if self.task != "preference":
            if self._given("preference"):
                raise RuleError("preference", f"a preference: section is set but task is '{self.task}': remove it or "
                                "set task: preference")
            if self.data.format == "preference":
                raise RuleError("data.format", "data.format 'preference' is for task: preference")
            return
        if self.data.format not in ("auto", *TASK_FORMATS["preference"]):
            raise RuleError("data.format", f"task preference reads prompt/chosen/rejected records; data.format "
                            f"'{self.data.format}' does not apply: use auto or preference")
        if self.data.packing:
            raise RuleError("data.packing", "task preference pads each pair (chosen and rejected side by side); "
                            "packing is not supported: remove data.packing")
        self.data.packing = False

    def _source_rules(self) -> None:
        """data.train / data.eval as lists of sources (every task: tasks.lm_data, tasks.classification_data,
        tasks.preference_data): formats of the task, distinct names, one mix."""
        d, r = self.data, self.regularization
        allowed = TASK_FORMATS[self.task]
        for key in ("train", "eval"):
            sources = getattr(d, key)
            if not isinstance(sources, list):
                continue
            for i, s in enumerate(sources):
                if s.format != "auto" and s.format not in allowed:
                    raise RuleError(f"data.{key}[{i}].format", f"format '{s.format}' does not apply to task "
                                    f"{self.task}: use auto or one of {', '.join(allowed)}")
            names = [s.label() for s in sources]
            twice = next((n for n in names if names.count(n) > 1), None)
            if twice:
                raise RuleError(f"data.{key}", f"two sources of data.{key} are named '{twice}': give each a "
                                "distinct name (name: ...)")
        if isinstance(d.train, list) and r.replay_data:
            raise RuleError("regularization.replay_data", "data.train is a list of sources: add the replay file to "
                            "it as a source with its weight instead of regularization.replay_data")
        if self._given("data", "mix_sampling") and not (isinstance(d.train, list) and len(d.train) > 1) and not r.replay_data:
            raise RuleError("data.mix_sampling", "data.mix_sampling applies to several training sources (data.train "
                            "as a list): remove it, or list the sources")

    def _check_bf16_weights(self) -> None:
        """train.weights_dtype bf16: what it combines with (train/bf16_adamw.py), each refusal naming the field."""
        why = "train.weights_dtype bf16 "
        if self.train.precision == "fp16" or (self.train.precision == "fp32" and self._given("train", "precision")):
            raise RuleError("train.precision", f"{why}computes in bf16; train.precision {self.train.precision} "
                            "contradicts it: set train.precision bf16 (or auto), or train.weights_dtype fp32")
        if self.method == "qlora":
            raise RuleError("train.weights_dtype", f"{why}does not combine with method qlora (its base is stored in "
                            "4 bits with its own compute dtype): use method lora, or train.weights_dtype fp32")
        if self.distributed.strategy != "ddp":
            raise RuleError("train.weights_dtype", f"{why}is not supported with distributed.strategy "
                            f"'{self.distributed.strategy}' (the sharded engines keep their own fp32 master "
                            "weights): use strategy ddp, or train.weights_dtype fp32")
        r = self.regularization
        for key in ("l2sp", "ewc", "mixout"):
            if getattr(r, key):
                raise RuleError(f"regularization.{key}", f"{why}does not combine with regularization.{key} yet (its "
                                "copy of the pre-trained weights and its penalty assume fp32 weights): remove it, or "
                                "set train.weights_dtype fp32")

    def _check_bf16_base(self) -> None:
        """lora.base_dtype bf16: a frozen base computed under bf16 autocast (models/frozen_weights.py)."""
        why = "lora.base_dtype bf16 "
        if self.train.precision == "fp16" or (self.train.precision == "fp32" and self._given("train", "precision")):
            raise RuleError("lora.base_dtype", f"{why}stores the frozen weights as bf16 autocast computes them; "
                            f"train.precision {self.train.precision} does not use bf16: set train.precision bf16 "
                            "(or auto), or lora.base_dtype auto")
        if self.lora.dora:
            raise RuleError("lora.base_dtype", f"{why}does not combine with lora.dora (DoRA's weight norm reads the "
                            "base weight in its own dtype): remove one")
        if self.distributed.strategy != "ddp":
            raise RuleError("lora.base_dtype", f"{why}is not supported with distributed.strategy "
                            f"'{self.distributed.strategy}' (the sharded engines keep one dtype for the weights they "
                            "shard): use strategy ddp, or lora.base_dtype auto")
        if self.unfreeze.every:
            raise RuleError("lora.base_dtype", f"{why}stores frozen weights; unfreeze.every trains them later: "
                            "remove one")

    def _given(self, section: str, key: str | None = None) -> bool:
        """Whether the user set a section (or one of its keys) to something that matters: a value
        other than the default, or any value in a hand-written config (a run dir's config.yaml, which
        spells out every default and carries `versions`, only counts where it differs)."""
        if key is None:
            sec = getattr(self, section)
            return section in self.model_fields_set and (self.versions is None or sec != type(sec)())
        sec = getattr(self, section)
        default = type(sec).model_fields[key].get_default(call_default_factory=True)
        return getattr(sec, key) != default or (key in sec.model_fields_set and self.versions is None)

    def _conflicts(self) -> None:
        """Options that contradict each other, or that the chosen task or method would silently ignore."""
        m, d = self.method, self.data
        for section, methods in (("lora", ("lora", "qlora")), ("freeze", ("freeze",)),
                                 ("feature_extraction", ("feature_extraction",))):
            if m not in methods and self._given(section):
                raise RuleError(section, f"a {section}: section is set but method is '{m}', which ignores it: "
                                f"remove the section or set method: {methods[0]}")
        if m == "feature_extraction" and self.task != "classification":
            raise RuleError("method", f"method 'feature_extraction' trains a new classification head; task '{self.task}' "
                            "has none: use method full, freeze, lora or qlora")
        if self.task == "classification":
            if self._given("data", "overflow"):
                raise RuleError("data.overflow", "data.overflow applies to chat and causal_lm only (classification "
                                "truncates at model.max_length): remove it")
            cols = {"text_column": d.text_column, "label_column": d.label_column, "text_pair_column": d.text_pair_column}
            names = [k for k, v in cols.items() if v is not None]
            for i, a in enumerate(names):
                for b in names[i + 1:]:
                    if cols[a] == cols[b]:
                        given = b if b in d.model_fields_set else a
                        raise RuleError(f"data.{given}", f"data.{a} and data.{b} both name the column '{cols[a]}': "
                                        "each must name a different column")
        else:
            for key in ("labels", "label_column", "text_pair_column", "header"):
                if self._given("data", key):
                    raise RuleError(f"data.{key}", f"data.{key} applies to classification only; task '{self.task}' "
                                    "reads conversations or text records: remove it")
        o = self.optim
        if o.head_lr is not None and "head_lr_multiplier" in o.model_fields_set and (
                self.versions is None or o.head_lr_multiplier != OptimConfig.model_fields["head_lr_multiplier"].default):
            raise RuleError("optim.head_lr", "set optim.head_lr or optim.head_lr_multiplier, not both "
                            "(head_lr overrides the multiplier)")
        if o.name == "adamw_8bit" and self.distributed.strategy != "ddp":
            raise RuleError("optim.name", f"optim.name adamw_8bit is not supported with distributed.strategy "
                            f"'{self.distributed.strategy}' (the sharded strategies build and shard their own "
                            "fp32 optimizer state): use optim.name adamw, or strategy ddp")
        r = self.regularization
        if self.train.weights_dtype == "bf16":
            self._check_bf16_weights()
        if self.lora.base_dtype == "bf16":
            self._check_bf16_base()
        if r.mixout and m in ("lora", "qlora"):  # LoRA keeps the base frozen; Mixout swaps the base's weights
            raise RuleError("regularization.mixout", f"Mixout acts on full weights; it does not combine with method "
                            f"'{m}' (use method: full, or remove regularization.mixout)")
        if r.replay_ratio > 0 and not r.replay_data:
            raise RuleError("regularization.replay_ratio", "regularization.replay_ratio needs regularization.replay_data "
                            "(the file to replay): set it, or remove replay_ratio")
        if r.replay_data and self.task == "preference":  # its setup mixes nothing in: refused, never ignored
            raise RuleError("regularization.replay_data", "task preference does not replay data: remove "
                            "regularization.replay_data (keep the policy near the reference with preference.beta, "
                            "or add the general pairs to data.train)")
        if r.replay_data and r.replay_ratio == 0:
            raise RuleError("regularization.replay_data", "regularization.replay_data is set but replay_ratio is 0, so "
                            "nothing is replayed: set regularization.replay_ratio (e.g. 0.1)")
        if r.ewc_data and r.ewc == 0:
            raise RuleError("regularization.ewc_data", "regularization.ewc_data is set but regularization.ewc is 0, so "
                            "no Fisher is computed: set regularization.ewc (e.g. 1.0) or remove ewc_data")
        c = self.checkpoint
        if c.metric and c.mode:
            metric = c.metric.removeprefix("eval_")
            lower = metric in ("loss", "perplexity") or metric.endswith(("_loss", "_perplexity"))
            higher = metric in ("accuracy", "macro_f1", "token_accuracy", "f1", "precision", "recall")
            if (lower and c.mode == "max") or (higher and c.mode == "min"):
                better = "min" if lower else "max"
                raise RuleError("checkpoint.mode", f"checkpoint.mode '{c.mode}' would keep the worst {c.metric} "
                                f"({'lower' if lower else 'higher'} is better): set mode: {better} or remove mode")


# ---------------------------------------------------------------- loading with locations


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that also records the line of every mapping key, by dotted path."""


MAX_DEPTH = 32  # sections are 2-3 levels deep; anything near this is a mistake or an attack
MAX_NODES = 100_000  # YAML aliases can make a small file stand for billions of values


def _check_shape(node: yaml.Node, path: str) -> None:
    """Refuse recursive aliases, nesting beyond MAX_DEPTH and alias expansion beyond MAX_NODES, before
    anything walks the tree recursively (PyYAML would build a cyclic object; the walk would never end)."""
    count, stack = 0, [(node, 1, frozenset())]
    while stack:
        n, depth, above = stack.pop()
        count += 1
        line = n.start_mark.line + 1
        if id(n) in above:
            raise InputError("recursive YAML alias (an anchor used inside itself)", file=path, line=line)
        if depth > MAX_DEPTH:
            raise InputError(f"YAML nested deeper than {MAX_DEPTH} levels", file=path, line=line)
        if count > MAX_NODES:
            raise InputError(f"YAML expands to more than {MAX_NODES} values (aliases?)", file=path, line=line)
        if isinstance(n, yaml.MappingNode):
            children = [c for kv in n.value for c in kv]
        elif isinstance(n, yaml.SequenceNode):
            children = n.value
        else:
            continue
        inner = above | {id(n)}
        stack.extend((c, depth + 1, inner) for c in children)


def _key_lines(node: yaml.Node, prefix: tuple = (), out: dict | None = None) -> dict[tuple, int]:
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = prefix + (key_node.value,)
            if path in out:  # PyYAML would silently keep the last one
                raise InputError(f"key appears twice (first on line {out[path]}); keep one",
                                 line=key_node.start_mark.line + 1, field=".".join(map(str, path)))
            out[path] = key_node.start_mark.line + 1
            _key_lines(value_node, path, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[prefix + (i,)] = item.start_mark.line + 1
            _key_lines(item, prefix + (i,), out)
    return out


def _parse_value(text: str) -> Any:
    """A `--set` value is read as YAML, so `1e-4`, `true`, `[a, b]` and `null` mean what they say."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b=c` overrides to the raw mapping (before validation, so types are checked)."""
    for item in overrides:
        key, eq, value = item.partition("=")
        parts = key.strip().split(".")
        if not eq or not all(parts):
            raise InputError(f"expects key=value, got '{item}'", where="--set", field=key.strip() or None)
        node = raw
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise InputError(f"'{p}' is not a section (it holds a value)", where="--set", field=key.strip())
            node = child
        node[parts[-1]] = _parse_value(value)
    return raw


def _yaml_number_fix(raw: Any) -> Any:
    """PyYAML reads `2e-5` (no dot) as a string; accept it as a float like every other YAML 1.2 reader."""
    if isinstance(raw, dict):
        return {k: _yaml_number_fix(v) for k, v in raw.items()}
    if isinstance(raw, list):
        return [_yaml_number_fix(v) for v in raw]
    if isinstance(raw, str):
        s = raw.strip()
        if s and s[0] in "0123456789+-." and ("e" in s.lower()):
            try:
                return float(s)
            except ValueError:
                return raw
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read, override and validate a config file; relative data paths resolve against the file."""
    from tunelab.data.readers import check_data_file

    path = check_data_file(path, "config file")  # a folder, a FIFO, a symlink loop: refused before reading
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise InputError(f"config is not UTF-8 text (byte 0x{data[e.start]:02x}); re-save it as UTF-8", file=path, line=line) from None
    if "\x00" in text:
        raise InputError("config holds a NUL byte (a binary file?)", file=path, line=text.count("\n", 0, text.index("\x00")) + 1)
    try:
        node = yaml.compose(text, Loader=_LineLoader)
        if node is not None:
            _check_shape(node, path)
        raw = yaml.load(text, Loader=_LineLoader)
    except RecursionError:
        raise InputError(f"YAML nested deeper than {MAX_DEPTH} levels", file=path) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(e, "problem", None) or str(e)
        raise InputError(f"invalid YAML: {problem}", file=path, line=line) from None
    if raw is None:
        raise InputError("config file is empty", file=path)
    if not isinstance(raw, dict):
        raise InputError("config must be a mapping of sections (task, model, data, ...)", file=path, line=1)
    overrides = overrides or []
    try:
        lines = _key_lines(node) if node is not None else {}
        raw = apply_overrides(_yaml_number_fix(raw), overrides)
    except InputError as e:
        raise InputError(e.message, file=path, line=e.line, where=e.where, field=e.field) from None
    from tunelab.defaults import apply_defaults

    return apply_defaults(_resolve_paths(validate_raw(raw, path=path, overrides=overrides, lines=lines), path.parent))


def given_keys(model: BaseModel) -> dict:
    """The keys a config's user set (in a file, with --set, through the API, or by assigning
    `cfg.train.epochs = 1`), as a mapping `config_from_dict` validates back; what defaults.py filled
    in is not among them, so the result re-resolves its own defaults. Unlike
    model_dump(exclude_unset=True), a section changed only by assignment counts as given."""
    out = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            inner = given_keys(value)
            if name in model.model_fields_set or inner:
                out[name] = inner
        elif name in model.model_fields_set:
            out[name] = model.model_dump(mode="json", include={name})[name]
    return out


def config_from_dict(raw: dict, base: str | Path | None = None) -> Config:
    """A config given as a mapping (the Python API, `tunelab.train({...})`): validated exactly as a
    file is, its errors naming the field (there is no file or line); relative paths resolve against
    `base` (default: the current folder)."""
    import copy

    if not isinstance(raw, dict):
        raise InputError(f"config must be a mapping of sections (task, model, data, ...), got {type(raw).__name__}")
    from tunelab.defaults import apply_defaults

    return apply_defaults(_resolve_paths(validate_raw(_yaml_number_fix(copy.deepcopy(raw))), Path(base or Path.cwd())))


def validate_raw(raw: dict, *, path: str | Path | None = None, overrides: list[str] = (),
                 lines: dict | None = None) -> Config:
    """The Config for a raw mapping; a pydantic error becomes one InputError naming the field, and
    the file and line when the mapping came from a file (`path`, with its key `lines`)."""
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = tuple(p for p in err["loc"] if not _is_type_tag(p))
        rule = (err.get("ctx") or {}).get("error")
        if isinstance(rule, RuleError):
            loc += tuple(rule.field.split("."))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            from tunelab.suggest import unknown_key_message

            msg = unknown_key_message(loc, Config)  # did you mean ..., incl. other tools' names; where keys are listed
        elif err["type"] == "missing":
            msg = f"item {loc[-1]} is missing" if loc and isinstance(loc[-1], int) else "required key is missing"
        elif "input" in err and not isinstance(err["input"], (dict, list)):
            msg += f" (got {err['input']!r})"
        field = ".".join(str(p) for p in loc) or None
        where = locate_key(path, loc, overrides, lines) if path is not None else {}
        raise InputError(msg, field=field, **where) from None


def _is_type_tag(part) -> bool:
    """pydantic puts the union member it tried into an error's location (`list[str]`, `literal['auto']`,
    `function-after[...]`); those are not keys and must not reach the field name."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "none", "tuple", "list"))


def locate_key(path: str | Path, key: str | tuple, overrides: list[str] = (), lines: dict | None = None) -> dict:
    """Where a config key was given, as InputError keywords: `--set` when an override set it (or a
    section above or below it), else the line of the deepest part of it that the file holds."""
    loc = tuple(str(p) for p in (key.split(".") if isinstance(key, str) else key))
    for item in overrides:
        set_path = tuple(item.partition("=")[0].strip().split("."))
        n = min(len(set_path), len(loc))
        if n and set_path[:n] == loc[:n]:
            return {"file": path, "where": "--set"}
    if lines is None:
        try:
            lines = _key_lines(yaml.compose(Path(path).read_text(encoding="utf-8"), Loader=_LineLoader))
        except (OSError, ValueError, yaml.YAMLError, InputError):
            lines = {}
    lines = {tuple(str(p) for p in k): v for k, v in lines.items()}
    for n in range(len(loc), 0, -1):
        if loc[:n] in lines:
            return {"file": path, "line": lines[loc[:n]]}
    return {"file": path}


def _resolve_paths(cfg: Config, base: Path) -> Config:
    def resolve(p: str | None) -> str | None:
        if p is None or p.startswith("hf:"):  # a Hugging Face dataset id (data.hf), not a path
            return p
        q = Path(p).expanduser()  # absolute, but links not followed: errors name the path the user gave
        return os.path.normpath(q if q.is_absolute() else base.absolute() / q)

    for key in ("train", "eval"):
        value = getattr(cfg.data, key)
        if isinstance(value, list):
            for source in value:
                source.path = resolve(source.path)
        else:
            setattr(cfg.data, key, resolve(value))
    cfg.probe.data = resolve(cfg.probe.data)
    cfg.regularization.ewc_data = resolve(cfg.regularization.ewc_data)
    cfg.regularization.replay_data = resolve(cfg.regularization.replay_data)
    cfg.eval.generate.prompts = resolve(cfg.eval.generate.prompts)
    local = (base / cfg.model.name).expanduser()
    if cfg.model.name.startswith((".", "/", "~")) or local.is_dir():
        cfg.model.name = os.path.normpath(local.absolute()) if not Path(cfg.model.name).is_absolute() else cfg.model.name
    return cfg


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("tunelab", "torch", "transformers", "safetensors", "pydantic", "numpy", "peft", "tokenizers", "accelerate"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def dump_config(cfg: Config, path: Path) -> None:
    """Write the fully resolved config (every default spelled out) plus library versions."""
    data = json.loads(cfg.model_dump_json())
    data["versions"] = library_versions()
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
