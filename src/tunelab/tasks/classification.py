"""Text classification: examples -> token ids -> padded batches; cross-entropy; accuracy & F1.

The data (every source checked, then encoded through the encoded-data cache, the label vocabulary,
the eval split, the mix of several sources) comes from tasks.classification_data; this module is the
model, the batches, the loss and the evaluation (over all eval rows, and per eval source when there
are several). The rows are checked before the model is touched, so bad data is reported as bad
data (file, line, field) whatever the model; the model's config then gives the length they are
encoded at.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from tunelab.data.batching import epoch_batches, pad_batch
from tunelab.data.classification import encode, load_examples, make_batches
from tunelab.data.encoded import UnitSources
from tunelab.evaluate.classification import classification_metrics, predict
from tunelab.models.load import load_classifier, load_tokenizer
from tunelab.models.registry import resolve_model
from tunelab.tasks.classification_data import (check_classification_data, data_quality, joined, label_counts,
                                               load_classification_data)
from tunelab.train.protocols import TaskRun, TrainSet
from tunelab.train.sizes import eval_batch_size, usable_max_length

log = logging.getLogger("tunelab")

PER_SOURCE = ("loss", "accuracy", "macro_f1")  # each eval source's own measures, eval_<name>_*


def classification_loss(model, batch: dict) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the micro-batch and its number of examples."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits.float()
    return torch.nn.functional.cross_entropy(logits, labels, reduction="sum"), labels.numel()


def table_batches(table, pad_id: int, batch_size: int):
    """A table's padded eval batches, grouped by length (data.classification.make_batches)."""
    return make_batches(table, table.labels, pad_id, batch_size, lengths=table.lengths)


def metrics_of_parts(parts: dict, names: list[str]) -> dict:
    """Accuracy, macro-F1 and loss over every eval row from `parts` {source name: (summed loss,
    predictions, labels)}; with several sources also each one's eval_<name>_loss / _accuracy / _macro_f1.
    Shared by the evaluator below and the feature cache (tasks.feature_cache)."""
    preds = [p for _, ps, _ in parts.values() for p in ps]
    ys = [y for _, _, part in parts.values() for y in part]
    metrics = classification_metrics(preds, ys, names)
    metrics["loss"] = sum(loss for loss, _, _ in parts.values()) / max(1, len(ys))
    if len(parts) > 1:
        for name, (loss, ps, part) in parts.items():
            own = classification_metrics(ps, part, names)
            metrics |= {f"{name}_loss": loss / max(1, len(part)), f"{name}_accuracy": own["accuracy"],
                        f"{name}_macro_f1": own["macro_f1"]}
    return metrics


def evaluator(evals: dict, names: list[str], pad_id: int, batch_size: int):
    """evaluate(model): metrics_of_parts over the eval tables {name: table}."""

    def evaluate(model) -> dict:
        return metrics_of_parts({name: predict(model, table_batches(t, pad_id, batch_size))
                                 for name, t in evals.items()}, names)

    return evaluate


def setup_classification(*, model_cfg, data_cfg, train_cfg, replay_data: str | None = None, replay_ratio: float = 0.0,
                         quantization=None) -> TaskRun:
    """Model, tokenizer, encoded examples and the loss/eval/save functions for task classification.

    The config's sections it reads (tunelab.compose chooses them): `model_cfg`, `data_cfg`,
    `train_cfg`, regularization's `replay_data` / `replay_ratio`; `quantization`: the loaders'
    argument for the method. The metric is the task's default (eval_accuracy, max);
    checkpoint.metric / mode replace it in tunelab.compose."""
    d, m = data_cfg, model_cfg
    checked = check_classification_data(d, replay_data=replay_data, replay_ratio=replay_ratio)  # before the model
    source = resolve_model(m.name)
    tokenizer = load_tokenizer(source, trust_remote_code=m.trust_remote_code, revision=m.revision)
    model = load_classifier(source, checked.names, trust_remote_code=m.trust_remote_code, revision=m.revision,
                            allow_pickle=m.allow_pickle, quantization=quantization)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if model.config.pad_token_id is None:
        model.config.pad_token_id = pad_id
    max_len = usable_max_length(m.max_length, model.config)  # the length the data is encoded (and cached) at
    data = load_classification_data(d, tokenizer, max_len, seed=train_cfg.seed, replay_data=replay_data,
                                    replay_ratio=replay_ratio, checked=checked)
    names, train, own = data.names, data.train, data.train_rows
    evaluation = joined(list(data.evals.values()))
    quality = data_quality(own, evaluation)
    cut = int(own.cut.sum())
    if cut:
        log.warning("%d of %d training texts are longer than %d tokens and were truncated", cut, len(own), max_len)
    labels = train.labels
    columns = {"text_column": d.text_column, "label_column": d.label_column, "text_pair_column": d.text_pair_column,
               "label_names": names, "declared": d.labels is not None}

    def collate(idx: list[int]) -> dict:
        return pad_batch([train[i] for i in idx], pad_id, labels[idx].tolist())

    evaluate = eval_batches = None
    eval_info = {}
    if data.evals:
        bs = eval_batch_size(train_cfg)
        evaluate = evaluator(data.evals, names, pad_id, bs)

        def eval_batches() -> dict:  # {source name: its padded batches}, for the feature cache
            return {name: table_batches(t, pad_id, bs) for name, t in data.evals.items()}

        eval_info = {"eval_rows": len(evaluation), "eval_label_counts": label_counts(evaluation, names)}
    per_source = [f"eval_{n}_{k}" for n in data.evals if n for k in PER_SOURCE]
    mixing = {"sources": data.sources, "mix_sampling": d.mix_sampling} if data.sources else {}

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
        train=TrainSet(lengths=train.lengths.tolist(), collate=collate, count=len,
                       epoch_subset=data.mix.epoch_subset if data.mix else None,
                       epoch_size=data.mix.epoch_size if data.mix else None, sources=UnitSources(train),
                       unit_source=data.mix.unit_source if data.mix else None),
        loss_fn=classification_loss,
        evaluate=evaluate,
        save_final=save_final,
        metric="eval_accuracy",
        mode="max",
        eval_batches=eval_batches,
        reference_batches=reference_batches,
        info={"metric_names": ["eval_loss", "eval_accuracy", "eval_macro_f1", *per_source], "labels": names,
              "train_rows": len(own), "train_label_counts": label_counts(own, names), "truncated_train_texts": cut,
              "model_source": source.path, "data_quality": quality, **eval_info, **mixing},
    )


__all__ = ["setup_classification", "classification_loss", "encode", "epoch_batches", "data_quality", "evaluator",
           "metrics_of_parts", "table_batches"]
