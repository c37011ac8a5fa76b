"""Text classification: examples -> token ids -> padded batches; cross-entropy; accuracy & F1."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import torch

from tunelab.data.batching import epoch_batches, pad_batch, replay_schedule
from tunelab.data.classification import Examples, encode, label_counts, load_examples, load_train_eval, make_batches
from tunelab.data.curate import pair_key, quality_counts
from tunelab.evaluate.classification import classification_metrics, predict
from tunelab.models.load import load_classifier, load_tokenizer
from tunelab.models.quantization import quantization_for
from tunelab.models.registry import resolve_model
from tunelab.train.protocols import TaskRun, TrainSet
from tunelab.train.sizes import eval_batch_size, usable_max_length

log = logging.getLogger("tunelab")


def classification_loss(model, batch: dict) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the micro-batch and its number of examples."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits.float()
    return torch.nn.functional.cross_entropy(logits, labels, reduction="sum"), labels.numel()


def evaluator(features, labels, names, pad_id, batch_size):
    def evaluate(model) -> dict:
        loss_sum, preds, ys = predict(model, make_batches(features, labels, pad_id, batch_size))
        metrics = classification_metrics(preds, ys, names)
        metrics["loss"] = loss_sum / max(1, len(ys))
        return metrics

    return evaluate


def data_quality(train_ex: Examples, eval_ex: Examples | None) -> dict:
    """Duplicate texts, label conflicts and eval rows also in train, counted on the examples as
    loaded (after the eval split), and logged as one warning line. Training data is not changed:
    `tunelab data clean` is the way to drop them (benchmarks rely on training what the file holds)."""

    def keys(ex: Examples) -> list[str]:
        return [pair_key(t, p) for t, p in zip(ex.texts, ex.pairs or [None] * len(ex))]

    q = quality_counts(keys(train_ex), train_ex.labels, train_ex.source,
                       keys(eval_ex) if eval_ex is not None else [], eval_ex.source if eval_ex is not None else [])
    parts = []
    for n, what, reason in ((q["duplicate_rows"], "rows repeat an earlier text", "duplicate"),
                            (q["label_conflict_rows"], "rows share a text with a row of another label", "label_conflict"),
                            (q["eval_rows_in_train"], "eval rows also appear in the training data", "leakage")):
        if n:
            parts.append(f"{n} {what} (e.g. {', '.join(q['examples'][reason][:2])})")
    if parts:
        log.warning("training data: %s; training uses them as they are (`tunelab data clean` drops them)",
                    "; ".join(parts))
    return q


def setup_classification(cfg) -> TaskRun:
    train_ex, eval_ex, names = load_train_eval(cfg.data, cfg.train.seed)
    quality = data_quality(train_ex, eval_ex)
    source = resolve_model(cfg.model.name)
    tokenizer = load_tokenizer(source, trust_remote_code=cfg.model.trust_remote_code, revision=cfg.model.revision)
    model = load_classifier(source, names, trust_remote_code=cfg.model.trust_remote_code, revision=cfg.model.revision,
                            allow_pickle=cfg.model.allow_pickle,
                            quantization=quantization_for(cfg.method, cfg.distributed.strategy))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if model.config.pad_token_id is None:
        model.config.pad_token_id = pad_id
    max_len = usable_max_length(cfg.model.max_length, model.config)
    train_feats, cut = encode(train_ex, tokenizer, max_len)
    if cut:
        log.warning("%d of %d training texts are longer than %d tokens and were truncated", cut, len(train_ex), max_len)
    labels = list(train_ex.labels)
    sources = list(train_ex.source)
    n_train = len(train_feats)
    epoch_subset = epoch_size = None
    if cfg.regularization.replay_data and cfg.regularization.replay_ratio > 0:
        # replay examples share the label vocabulary; they follow the training examples by index
        replay_ex, _ = load_examples(cfg.regularization.replay_data, text_column=cfg.data.text_column,
                                     label_column=cfg.data.label_column, text_pair_column=cfg.data.text_pair_column,
                                     label_names=names, declared=cfg.data.labels is not None)
        replay_feats, _ = encode(replay_ex, tokenizer, max_len)
        train_feats = train_feats + replay_feats
        labels += replay_ex.labels
        sources += replay_ex.source
        epoch_subset, epoch_size = replay_schedule(n_train, len(replay_feats), cfg.regularization.replay_ratio,
                                                   cfg.train.seed)

    def collate(idx: list[int]) -> dict:
        return pad_batch([train_feats[i] for i in idx], pad_id, [labels[i] for i in idx])

    evaluate = eval_batches = None
    eval_info = {}
    if eval_ex is not None:
        eval_feats, _ = encode(eval_ex, tokenizer, max_len)
        bs = eval_batch_size(cfg.train)
        evaluate = evaluator(eval_feats, eval_ex.labels, names, pad_id, bs)
        eval_batches = partial(make_batches, eval_feats, eval_ex.labels, pad_id, bs)
        eval_info = {"eval_rows": len(eval_ex), "eval_label_counts": label_counts(eval_ex, names)}

    def reference_batches(path: str, batch_size: int) -> list[dict]:
        ref, _ = load_examples(path, text_column=cfg.data.text_column, label_column=cfg.data.label_column,
                               text_pair_column=cfg.data.text_pair_column, label_names=names,
                               declared=cfg.data.labels is not None)
        feats, _ = encode(ref, tokenizer, max_len)
        return [pad_batch(feats[i : i + batch_size], pad_id, ref.labels[i : i + batch_size])
                for i in range(0, len(feats), batch_size)]

    def save_final(model, out: Path) -> None:
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)

    return TaskRun(
        model=model,
        tokenizer=tokenizer,
        train=TrainSet(lengths=[len(f["input_ids"]) for f in train_feats], collate=collate, count=len,
                       epoch_subset=epoch_subset, epoch_size=epoch_size, sources=sources),
        loss_fn=classification_loss,
        evaluate=evaluate,
        save_final=save_final,
        metric=cfg.checkpoint.metric or "eval_accuracy",
        mode=cfg.checkpoint.mode or "max",
        eval_batches=eval_batches,
        reference_batches=reference_batches,
        info={"metric_names": ["eval_loss", "eval_accuracy", "eval_macro_f1"], "labels": names, "train_rows": len(train_ex), "train_label_counts": label_counts(train_ex, names),
              "truncated_train_texts": cut, "model_source": source.path, "data_quality": quality, **eval_info},
    )


__all__ = ["setup_classification", "classification_loss", "encode", "epoch_batches"]
