"""Causal LM fine-tuning: plain text (every token supervised) and chat (assistant tokens only).

read (data.chat) -> encode with the model's own chat template and loss masks (data.chat_template)
-> pack into rows of model.max_length with a block-diagonal mask, or pad (data.packing) -> the one
loop, with the loss summed over supervised tokens and counted in supervised tokens, so the loop's
normalisation makes accumulation equal to one large batch.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from tunelab.errors import InputError
from tunelab.evaluate.generation_run import generation_for, held_out_data, with_generation
from tunelab.evaluate.lm import lm_metrics, supervised_loss
from tunelab.models.gguf import end_of_turn_id, plain_source
from tunelab.models.load import load_causal_lm, load_tokenizer
from tunelab.models.quantization import quantization_for
from tunelab.models.registry import resolve_model
from tunelab.train.protocols import TaskRun, TrainSet
from tunelab.train.sizes import eval_batch_size, usable_max_length

log = logging.getLogger("tunelab")

METRIC_NAMES = ["eval_loss", "eval_perplexity", "eval_token_accuracy"]


def n_supervised(example) -> int:
    """Supervised next-token targets of one example (labels[0] is never a target, so its label is
    always IGNORE_INDEX and the example's own count is the count of targets)."""
    return example.supervised()


def batcher(examples, pad_id: int, packing: bool, max_length: int):
    """(units, collate): the training units (packs of examples, or single examples) and how to batch them."""
    from tunelab.data.packing import collate_packed, collate_padded, pack, stack_rows

    if packing:
        units = pack([len(e.input_ids) for e in examples], max_length)

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
    units, collate = batcher(examples, pad_id, packing, max_length)
    order = sorted(range(len(units)), key=lambda i: sum(len(examples[j].input_ids) for j in units[i]))
    for start in range(0, len(order), batch_size):
        yield collate(order[start : start + batch_size])


def split_examples(examples: list, share: float, seed: int) -> tuple[list, list]:
    if share <= 0 or len(examples) < 2:
        return examples, []
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(examples), generator=g).tolist()
    n_eval = min(len(examples) - 1, max(1, round(len(examples) * share)))
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def read_and_encode(path: str, cfg, tokenizer, max_length: int, task: str):
    from tunelab.data.chat import read_chat_data
    from tunelab.data.chat_template import check_template, encode_dataset

    data = read_chat_data(path, fmt=cfg.data.format)
    if task == "chat" and data.kind != "conversations":
        raise InputError("task 'chat' needs conversations (openai, sharegpt, alpaca, prompt_completion); "
                         "for plain text use task: causal_lm", file=path, field="data.format")
    warnings = check_template(tokenizer, data.conversations) if data.kind == "conversations" else []
    if cfg.data.max_rows:
        data.conversations, data.texts = data.conversations[: cfg.data.max_rows], data.texts[: cfg.data.max_rows]
    examples, stats = encode_dataset(data, tokenizer, max_length, overflow=cfg.data.overflow)
    if stats.get("dropped_overflow"):
        log.warning("%s: %d examples longer than %d tokens were dropped (data.overflow: drop)",
                    path, stats["dropped_overflow"], max_length)
    if stats.get("truncated"):
        log.warning("%s: %d examples longer than %d tokens were cut (data.overflow: truncate); "
                    "raise model.max_length to keep them whole", path, stats["truncated"], max_length)
    if not examples:
        raise InputError(f"no example left after encoding ({stats})", file=path, field="data.train")
    if not any(n_supervised(e) for e in examples):
        raise InputError("no supervised token in the data (no assistant turn survived truncation?)", file=path)
    return data, examples, dict(stats), warnings


def _summary(examples) -> dict:
    tokens = sum(len(e.input_ids) for e in examples)
    sup = sum(n_supervised(e) for e in examples)
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


def setup_causal_lm(cfg) -> TaskRun:
    """Model, tokenizer, encoded data and the loss/eval/save functions for task causal_lm or chat."""
    source = plain_source(resolve_model(cfg.model.name))
    tokenizer = load_tokenizer(source, trust_remote_code=cfg.model.trust_remote_code, revision=cfg.model.revision)
    model = load_causal_lm(source, trust_remote_code=cfg.model.trust_remote_code, revision=cfg.model.revision,
                           allow_pickle=cfg.model.allow_pickle,
                           quantization=quantization_for(cfg.method))
    max_len = usable_max_length(cfg.model.max_length, model.config)
    if cfg.task == "chat" and not tokenizer.chat_template:
        raise InputError("the model's tokenizer has no chat template; use task: causal_lm, or a chat model",
                         field="model.name", file=source.path)
    eot = end_of_turn_id(tokenizer) if cfg.task == "chat" else None
    eos_id = eot if eot is not None else tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_id or 0)

    data, train_ex, stats, warnings = read_and_encode(cfg.data.train, cfg, tokenizer, max_len, cfg.task)
    for w in warnings:
        log.warning("chat template: %s", w)
    if cfg.data.eval:
        eval_data, eval_ex, eval_stats, _ = read_and_encode(cfg.data.eval, cfg, tokenizer, max_len, cfg.task)
    else:
        all_ex = train_ex
        train_ex, eval_ex = split_examples(train_ex, cfg.data.eval_split, cfg.train.seed)
        eval_data, eval_stats = held_out_data(data, all_ex, eval_ex), None
    generation = generation_for(cfg, tokenizer, eval_data) if eval_ex else None

    units, collate = batcher(train_ex, pad_id, cfg.data.packing, max_len)
    unit_tokens = [sum(len(train_ex[j].input_ids) for j in u) for u in units]
    unit_sup = [sum(n_supervised(train_ex[j]) for j in u) for u in units]
    # a packed unit holds several examples: a NaN/Inf step names all of their file:line places
    unit_sources = [", ".join(dict.fromkeys(train_ex[j].source for j in u if train_ex[j].source)) or f"#{i}"
                    for i, u in enumerate(units)]

    evaluate = None
    if eval_ex:
        bs = eval_batch_size(cfg.train)

        def evaluate(model) -> dict:
            return lm_metrics(model, eval_batches(eval_ex, pad_id, cfg.data.packing, max_len, bs))

        evaluate = with_generation(evaluate, generation)

    return TaskRun(
        model=model,
        tokenizer=tokenizer,
        train=TrainSet(lengths=unit_tokens, collate=collate, count=lambda idx: sum(unit_sup[i] for i in idx),
                       sources=unit_sources),
        loss_fn=supervised_loss,
        evaluate=evaluate,
        save_final=lm_saver(tokenizer, eos_id, pad_id),
        metric=cfg.checkpoint.metric or "eval_loss",
        mode=cfg.checkpoint.mode or "min",
        info={"metric_names": METRIC_NAMES, "kind": data.kind, "model_source": source.path,
              "max_length": max_len, "packing": cfg.data.packing, "train_units": len(units),
              "train": _summary(train_ex), "encode_stats": stats, "template_warnings": warnings,
              "eval": _summary(eval_ex) if eval_ex else None, "eval_encode_stats": eval_stats,
              "eos_token_id": eos_id},
        generation=generation,
    )


__all__ = ["setup_causal_lm", "batcher", "split_examples", "n_supervised"]
