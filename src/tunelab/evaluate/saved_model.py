"""Evaluate any saved sequence-classification folder on a labelled file (`tunelab eval`)."""

from __future__ import annotations

from pathlib import Path

from tunelab.data.classification import encode, load_examples, make_batches
from tunelab.evaluate.classification import classification_metrics, predict
from tunelab.models.saved import load_saved_classifier
from tunelab.train.sizes import usable_max_length


def evaluate_saved_classifier(model_dir: str | Path, data: str | Path, *, text_column="text", label_column="label",
                              batch_size: int = 64, max_length: int = 128) -> dict:
    model, tok = load_saved_classifier(model_dir)
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    ex, _ = load_examples(data, text_column=text_column, label_column=label_column, label_names=names, declared=True)
    max_length = usable_max_length(max_length, model.config)
    feats, _ = encode(ex, tok, max_length)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    loss_sum, preds, ys = predict(model, make_batches(feats, ex.labels, pad_id, batch_size))
    metrics = classification_metrics(preds, ys, names)
    metrics["loss"] = loss_sum / len(ys)
    metrics["rows"] = len(ys)
    return metrics
