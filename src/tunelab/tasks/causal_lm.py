"""Causal LM fine-tuning: plain text (every token supervised) and chat (assistant tokens only).

read (data.chat) -> encode with the model's own chat template and loss masks (data.chat_template)
-> pack into rows of model.max_length with a block-diagonal mask, or pad (data.packing) -> the one
loop, with the loss summed over supervised tokens and counted in supervised tokens, so the loop's
normalisation makes accumulation equal to one large batch.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path


from tunelab.errors import InputError
from tunelab.evaluate.generation_run import generation_for, with_generation
from tunelab.evaluate.lm import lm_metrics, supervised_loss
from tunelab.models.gguf import end_of_turn_id, plain_source
from tunelab.models.load import load_causal_lm, load_tokenizer
from tunelab.models.registry import resolve_model
from tunelab.tasks.lm_speed import lm_speed
from tunelab.tasks.lm_data import (load_lm_data, prepare_lm_data, read_and_encode, split_examples,  # noqa: F401
                                   split_indices)
from tunelab.train.protocols import TaskRun, TrainSet
from tunelab.train.sizes import eval_batch_size, usable_max_length

log = logging.getLogger("tunelab")

METRIC_NAMES = ["eval_loss", "eval_perplexity", "eval_token_accuracy"]


def n_supervised(example) -> int:
    """Supervised next-token targets of one example (labels[0] is never a target, so its label is
    always IGNORE_INDEX and the example's own count is the count of targets)."""
    return example.supervised()


def batcher(examples, pad_id: int, packing: bool, max_length: int, units: list[list[int]] | None = None):
    """(units, collate): the training units (packs of examples, or single examples) and how to batch them.

    `examples`: a table (data.encoded) or a list; packing reads only the lengths. `units`: the packs
    made already (data mixing packs each source on its own)."""
    from tunelab.data.encoded import lengths_of
    from tunelab.data.packing import collate_packed, collate_padded, pack, stack_rows

    if packing:
        units = pack(lengths_of(examples), max_length) if units is None else units

        def collate(idx: list[int]) -> dict:
            rows = [collate_packed(examples, units[i]) for i in idx]
            batch = stack_rows(rows, pad_id)
            batch.setdefault("num_tokens", int(batch["input_ids"].numel()))
            return batch
    else:
        units = [[i] for i in range(len(examples))]

        def collate(idx: list[int]) -> dict:
            return collate_padded(examples, [units[i][0] for i in idx], pad_id)

    return units, collate


def eval_batches(examples, pad_id: int, packing: bool, max_length: int, batch_size: int):
    from tunelab.data.encoded import lengths_of

    units, collate = batcher(examples, pad_id, packing, max_length)
    lengths = lengths_of(examples)
    order = sorted(range(len(units)), key=lambda i: sum(lengths[j] for j in units[i]))
    for start in range(0, len(order), batch_size):
        yield collate(order[start : start + batch_size])


def _joined(evals: dict):
    """The eval tables as one (None when there is none)."""
    if not evals:
        return None
    if len(evals) == 1:
        return next(iter(evals.values()))
    from tunelab.data.mixing import ConcatTable

    return ConcatTable(list(evals.values()))


def evaluator(evals: dict, pad_id: int, packing: bool, max_len: int, batch_size: int):
    """evaluate(model): lm_metrics over all eval tables; with several named ones also each one's loss
    (eval_<name>_loss), and the overall measures weighted by each one's supervised tokens."""

    def evaluate(model) -> dict:
        parts = {name: lm_metrics(model, eval_batches(t, pad_id, packing, max_len, batch_size))
                 for name, t in evals.items()}
        if len(parts) == 1:
            return next(iter(parts.values()))
        n = sum(p["supervised_tokens"] for p in parts.values())
        loss = sum(p["loss"] * p["supervised_tokens"] for p in parts.values()) / n if n else float("nan")
        out = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)) if n else float("nan"),
               "token_accuracy": sum(p["token_accuracy"] * p["supervised_tokens"] for p in parts.values()) / n
               if n else float("nan"), "supervised_tokens": n}
        return out | {f"{name}_loss": p["loss"] for name, p in parts.items()}

    return evaluate


def _summary(examples) -> dict:
    from tunelab.data.encoded import lengths_of, supervised_of

    tokens, sup = sum(lengths_of(examples)), sum(supervised_of(examples))
    return {"examples": len(examples), "tokens": tokens, "supervised_tokens": sup,
            "supervised_share": round(sup / tokens, 4) if tokens else 0.0}


def lm_saver(tokenizer, eos_id: int | None, pad_id: int):
    """save_final of an LM task: the model with its end-of-turn token as eos (generation stops there), the tokenizer."""

    def save_final(model, out: Path) -> None:
        if eos_id is not None:
            model.generation_config.eos_token_id = eos_id
            model.generation_config.pad_token_id = pad_id
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)

    return save_final


def setup_causal_lm(*, task: str, model_cfg, data_cfg, train_cfg, generate_cfg, replay_data: str | None = None,
                    replay_ratio: float = 0.0, quantization=None) -> TaskRun:
    """Model, tokenizer, encoded data and the loss/eval/save functions for task causal_lm or chat.

    The config's sections it reads (tunelab.compose chooses them): `model_cfg`, `data_cfg`, `train_cfg`,
    `generate_cfg` (eval.generate), regularization's `replay_data` / `replay_ratio`; `quantization`:
    the loaders' argument for the method (models.quantization.quantization_for). The metric is
    the task's default (eval_loss, min); checkpoint.metric / mode replace it in tunelab.compose."""
    source = plain_source(resolve_model(model_cfg.name))
    tokenizer = load_tokenizer(source, trust_remote_code=model_cfg.trust_remote_code, revision=model_cfg.revision)
    model = load_causal_lm(source, trust_remote_code=model_cfg.trust_remote_code, revision=model_cfg.revision,
                           allow_pickle=model_cfg.allow_pickle, quantization=quantization)
    max_len = usable_max_length(model_cfg.max_length, model.config)
    if task == "chat" and not tokenizer.chat_template:
        raise InputError("the model's tokenizer has no chat template; use task: causal_lm, or a chat model",
                         field="model.name", file=source.path)
    eot = end_of_turn_id(tokenizer) if task == "chat" else None
    eos_id = eot if eot is not None else tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_id or 0)

    lm = load_lm_data(data_cfg, tokenizer, max_len, task=task, seed=train_cfg.seed, generating=bool(generate_cfg.n),
                      replay_data=replay_data, replay_ratio=replay_ratio)
    train_ex = lm.train
    generation = generation_for(generate_cfg, tokenizer, lm.eval_data) if lm.evals else None

    from tunelab.data.encoded import UnitSources, lengths_of, supervised_of

    units, collate = batcher(train_ex, pad_id, data_cfg.packing, max_len, units=lm.units)
    collate, loss_fn = lm_speed(train_cfg, model, collate, data_cfg.packing)  # packed attention, chunked loss
    lengths, supervised = lengths_of(train_ex), supervised_of(train_ex)
    unit_tokens = [sum(lengths[j] for j in u) for u in units]
    unit_sup = [sum(supervised[j] for j in u) for u in units]
    # a packed unit holds several examples: a NaN/Inf step names all of their file:line places
    unit_sources = UnitSources(train_ex, units)

    evaluate = None
    if lm.evals:
        evaluate = with_generation(evaluator(lm.evals, pad_id, data_cfg.packing, max_len, eval_batch_size(train_cfg)),
                                   generation)
    all_eval = _joined(lm.evals)
    per_source = [f"eval_{name}_loss" for name in lm.evals if name]
    return TaskRun(
        model=model,
        tokenizer=tokenizer,
        train=TrainSet(lengths=unit_tokens, collate=collate, count=lambda idx: sum(unit_sup[i] for i in idx),
                       sources=unit_sources, epoch_subset=lm.epoch_subset, epoch_size=lm.epoch_size,
                       unit_source=lm.mix.unit_source if lm.mix else None,
                       unit_rows=[len(u) for u in units] if lm.mix else None),
        loss_fn=loss_fn,
        evaluate=evaluate,
        save_final=lm_saver(tokenizer, eos_id, pad_id),
        metric="eval_loss",
        mode="min",
        info={"metric_names": METRIC_NAMES + per_source, "kind": lm.kind, "model_source": source.path,
              "max_length": max_len, "packing": data_cfg.packing, "train_units": len(units),
              "train": _summary(train_ex), "encode_stats": lm.stats, "template_warnings": lm.warnings,
              "eval": _summary(all_eval) if all_eval is not None else None, "eval_encode_stats": lm.eval_stats,
              "eos_token_id": eos_id, **({"sources": lm.sources, "mix_sampling": data_cfg.mix_sampling}
                                         if lm.sources else {})},
        generation=generation,
    )


__all__ = ["setup_causal_lm", "batcher", "split_examples", "split_indices", "n_supervised", "read_and_encode"]
