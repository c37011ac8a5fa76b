"""Classification metrics from predictions and labels, and evaluation of a model over batches."""

from __future__ import annotations

import torch

from tunelab.device import model_device, to_device


def classification_metrics(preds: list[int], labels: list[int], names: list[str]) -> dict:
    """accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix.

    The confusion matrix has a row per true class and a column per predicted class. A class with
    no predictions has precision 0 (sklearn's `zero_division=0`), and one absent from the labels
    is left out of the macro average.
    """
    k = len(names)
    cm = [[0] * k for _ in range(k)]
    for p, y in zip(preds, labels):
        cm[y][p] += 1
    per_class, f1s = {}, []
    for c, name in enumerate(names):
        tp = cm[c][c]
        predicted = sum(cm[r][c] for r in range(k))
        support = sum(cm[c])
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
        if support:
            f1s.append(f1)
    n = len(labels)
    return {
        "accuracy": sum(cm[c][c] for c in range(k)) / n if n else 0.0,
        "macro_f1": sum(f1s) / len(f1s) if f1s else 0.0,
        "per_class": per_class,
        "confusion_matrix": cm,
        "labels": list(names),
    }


@torch.no_grad()
def predict(model, batches) -> tuple[float, list[int], list[int]]:
    """Summed cross-entropy, predictions and labels over an iterable of padded batches (at the caller's
    precision: the run wraps its whole evaluation in the training autocast)."""
    was_training = model.training
    model.eval()
    loss_sum, preds, labels = 0.0, [], []
    try:
        device = model_device(model)
        for batch in batches:
            batch = to_device(batch, device)
            y = batch.pop("labels")
            logits = model(**batch).logits.float()
            loss_sum += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
            preds += logits.argmax(-1).tolist()
            labels += y.tolist()
    finally:
        model.train(was_training)
    return loss_sum, preds, labels
