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


def setup_classification(*, model_cfg, data_cfg, train_cfg, replay_data: str | None = None, replay_ratio: float = 0.0,
                         quantization=None) -> TaskRun:
    """Model, tokenizer, encoded examples and the loss/eval/save functions for task classification.

    The config's sections it reads (tunelab.compose chooses them): `model_cfg`, `data_cfg`,
    `train_cfg`, regularization's `replay_data` / `replay_ratio`; `quantization`: the loaders'
    argument for the method. The metric is the task's default (eval_accuracy, max);
    checkpoint.metric / mode replace it in tunelab.compose."""
    d, m = data_cfg, model_cfg
    train_ex, eval_ex, names = load_train_eval(d, train_cfg.seed)
    quality = data_quality(train_ex, eval_ex)
    source = resolve_model(m.name)
    tokenizer = load_tokenizer(source, trust_remote_code=m.trust_remote_code, revision=m.revision)
    model = load_classifier(source, names, trust_remote_code=m.trust_remote_code, revision=m.revision,
                            allow_pickle=m.allow_pickle, quantization=quantization)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if model.config.pad_token_id is None:
        model.config.pad_token_id = pad_id
    max_len = usable_max_length(m.max_length, model.config)
    train_feats, cut = encode(train_ex, tokenizer, max_len)
    if cut:
        log.warning("%d of %d training texts are longer than %d tokens and were truncated", cut, len(train_ex), max_len)
    labels = list(train_ex.labels)
    sources = list(train_ex.source)
    n_train = len(train_feats)
    epoch_subset = epoch_size = None
    columns = {"text_column": d.text_column, "label_column": d.label_column, "text_pair_column": d.text_pair_column,
               "label_names": names, "declared": d.labels is not None}
    if replay_data and replay_ratio > 0:
        # replay examples share the label vocabulary; they follow the training examples by index
        replay_ex, _ = load_examples(replay_data, **columns)
        replay_feats, _ = encode(replay_ex, tokenizer, max_len)
        train_feats = train_feats + replay_feats
        labels += replay_ex.labels
        sources += replay_ex.source
        epoch_subset, epoch_size = replay_schedule(n_train, len(replay_feats), replay_ratio, train_cfg.seed)

    def collate(idx: list[int]) -> dict:
        return pad_batch([train_feats[i] for i in idx], pad_id, [labels[i] for i in idx])

    evaluate = eval_batches = None
    eval_info = {}
    if eval_ex is not None:
        eval_feats, _ = encode(eval_ex, tokenizer, max_len)
        bs = eval_batch_size(train_cfg)
        evaluate = evaluator(eval_feats, eval_ex.labels, names, pad_id, bs)
        eval_batches = partial(make_batches, eval_feats, eval_ex.labels, pad_id, bs)
        eval_info = {"eval_rows": len(eval_ex), "eval_label_counts": label_counts(eval_ex, names)}

    def reference_batches(path: str, batch_size: int) -> list[dict]:
        ref, _ = load_examples(path, **columns)
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
        metric="eval_accuracy",
        mode="max",
        eval_batches=eval_batches,
        reference_batches=reference_batches,
        info={"metric_names": ["eval_loss", "eval_accuracy", "eval_macro_f1"], "labels": names, "train_rows": len(train_ex), "train_label_counts": label_counts(train_ex, names),
              "truncated_train_texts": cut, "model_source": source.path, "data_quality": quality, **eval_info},
    )


__all__ = ["setup_classification", "classification_loss", "encode", "epoch_batches"]
