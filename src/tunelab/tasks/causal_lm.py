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
from tunelab.evaluate.generation_run import generation_for, held_out_at, with_generation
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
    """(units, collate): the training units (packs of examples, or single examples) and how to batch them.

    `examples`: a table (data.encoded) or a list; packing reads only the lengths."""
    from tunelab.data.encoded import lengths_of
    from tunelab.data.packing import collate_packed, collate_padded, pack, stack_rows

    if packing:
        units = pack(lengths_of(examples), max_length)

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


def split_indices(n: int, share: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, held-out) example indices: `share` of n held out at random (at least 1, never all)."""
    if share <= 0 or n < 2:
        return list(range(n)), []
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g).tolist()
    n_eval = min(n - 1, max(1, round(n * share)))
    held = set(order[:n_eval])
    return [i for i in range(n) if i not in held], sorted(held)


def split_examples(examples, share: float, seed: int) -> tuple[list, list]:
    train_idx, held_idx = split_indices(len(examples), share, seed)
    if not held_idx:
        return examples, []
    return [examples[i] for i in train_idx], [examples[i] for i in held_idx]


def read_limited(path: str, cfg, task: str):
    """The data file's records as ChatData, checked against the task, cut to data.max_rows."""
    from tunelab.data.chat import read_chat_data

    data = read_chat_data(path, fmt=cfg.data.format)
    if task == "chat" and data.kind != "conversations":
        raise InputError("task 'chat' needs conversations (openai, sharegpt, alpaca, prompt_completion); "
                         "for plain text use task: causal_lm", file=path, field="data.format")
    if cfg.data.max_rows:
        data.conversations, data.texts = data.conversations[: cfg.data.max_rows], data.texts[: cfg.data.max_rows]
    return data


def encode_file(path: str, cfg, tokenizer, max_length: int, task: str):
    """Read, check and encode a data file: (data, examples, stats, template warnings)."""
    from tunelab.data.chat_template import check_template, encode_dataset

    data = read_limited(path, cfg, task)
    warnings = check_template(tokenizer, data.conversations) if data.kind == "conversations" else []
    examples, stats = encode_dataset(data, tokenizer, max_length, overflow=cfg.data.overflow,
                                     num_proc=cfg.data.num_proc)
    if not examples:
        raise InputError(f"no example left after encoding ({stats})", file=path, field="data.train")
    if not any(n_supervised(e) for e in examples):
        raise InputError("no supervised token in the data (no assistant turn survived truncation?)", file=path)
    return data, examples, dict(stats), warnings


def lm_cache_parts(path: str, cfg, tokenizer, max_length: int, task: str) -> dict:
    """Everything that changes what encode_file returns (the data cache's fingerprint)."""
    from tunelab.data.cache import file_stamp, tokenizer_stamp

    return {"encoder": "lm", "task": task, "files": [file_stamp(path)], "format": cfg.data.format,
            "max_rows": cfg.data.max_rows, "max_length": max_length, "overflow": cfg.data.overflow,
            "tokenizer": tokenizer_stamp(tokenizer)}


def read_and_encode(path: str, cfg, tokenizer, max_length: int, task: str):
    """(data, table, stats, template warnings) of a data file; `table` (data.encoded) has the examples.

    With data.cache (the default) the examples come from the encoded-data cache (data.cache), built
    on the first run; `data` (the records, for generation prompts) is then None: read_limited reads it.
    """
    from tunelab.data.encoded import LM_LAYOUT, MemoryTable, StoreTable, write_examples

    if not cfg.data.cache:
        data, examples, stats, warnings = encode_file(path, cfg, tokenizer, max_length, task)
        table, kind = MemoryTable(examples), data.kind
    else:
        from tunelab.data.cache import open_or_build

        fresh = {}

        def build(writer) -> dict:
            fresh["data"], examples, stats, warnings = encode_file(path, cfg, tokenizer, max_length, task)
            write_examples(writer, examples)
            return {"kind": fresh["data"].kind, "stats": stats, "warnings": warnings}

        store = open_or_build(lm_cache_parts(path, cfg, tokenizer, max_length, task), LM_LAYOUT, build, what=str(path))
        table, data = StoreTable(store), fresh.get("data")
        kind, stats, warnings = store.meta["kind"], dict(store.meta["stats"]), list(store.meta["warnings"])
    table.kind = kind
    if stats.get("dropped_overflow"):
        log.warning("%s: %d examples longer than %d tokens were dropped (data.overflow: drop)",
                    path, stats["dropped_overflow"], max_length)
    if stats.get("truncated"):
        log.warning("%s: %d examples longer than %d tokens were cut (data.overflow: truncate); "
                    "raise model.max_length to keep them whole", path, stats["truncated"], max_length)
    return data, table, stats, warnings


def prepare_lm_data(cfg) -> list[Path]:
    """Encode the training (and eval) file into the data cache as setup_causal_lm would, loading only
    the tokenizer and the model's config (not its weights); the cache entries' folders."""
    from transformers import AutoConfig

    source = plain_source(resolve_model(cfg.model.name))
    tokenizer = load_tokenizer(source, trust_remote_code=cfg.model.trust_remote_code, revision=cfg.model.revision)
    config = AutoConfig.from_pretrained(source.path, trust_remote_code=cfg.model.trust_remote_code,
                                        revision=cfg.model.revision)
    max_len = usable_max_length(cfg.model.max_length, config)
    tables = [read_and_encode(path, cfg, tokenizer, max_len, cfg.task)[1] for path in (cfg.data.train, cfg.data.eval) if path]
    return [t.store.folder for t in tables if hasattr(t, "store")]


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
    kind = train_ex.kind
    generating = bool(cfg.eval.generate.n)
    if cfg.data.eval:
        eval_data, eval_ex, eval_stats, _ = read_and_encode(cfg.data.eval, cfg, tokenizer, max_len, cfg.task)
        if generating and eval_data is None:  # encoded data came from the cache: the prompts from the file
            eval_data = read_limited(cfg.data.eval, cfg, cfg.task)
    else:
        n_all = len(train_ex)
        train_idx, held_idx = split_indices(n_all, cfg.data.eval_split, cfg.train.seed)
        train_ex, eval_ex = (train_ex.subset(train_idx), train_ex.subset(held_idx)) if held_idx else (train_ex, [])
        eval_stats = eval_data = None
        if generating and held_idx:
            eval_data = held_out_at(data if data is not None else read_limited(cfg.data.train, cfg, cfg.task),
                                    n_all, held_idx)
    generation = generation_for(cfg, tokenizer, eval_data) if len(eval_ex) else None

    from tunelab.data.encoded import lengths_of, supervised_of

    units, collate = batcher(train_ex, pad_id, cfg.data.packing, max_len)
    lengths, supervised = lengths_of(train_ex), supervised_of(train_ex)
    unit_tokens = [sum(lengths[j] for j in u) for u in units]
    unit_sup = [sum(supervised[j] for j in u) for u in units]
    # a packed unit holds several examples: a NaN/Inf step names all of their file:line places
    unit_sources = [", ".join(dict.fromkeys(s for s in map(train_ex.source, u) if s)) or f"#{i}"
                    for i, u in enumerate(units)]

    evaluate = None
    if len(eval_ex):
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
        info={"metric_names": METRIC_NAMES, "kind": kind, "model_source": source.path,
              "max_length": max_len, "packing": cfg.data.packing, "train_units": len(units),
              "train": _summary(train_ex), "encode_stats": stats, "template_warnings": warnings,
              "eval": _summary(eval_ex) if len(eval_ex) else None, "eval_encode_stats": eval_stats,
              "eos_token_id": eos_id},
        generation=generation,
    )


__all__ = ["setup_causal_lm", "batcher", "split_examples", "split_indices", "n_supervised", "read_and_encode"]
