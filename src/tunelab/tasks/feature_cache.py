"""Feature extraction with a cache: run the frozen backbone once, then train only the head.

The backbone is frozen and in inference mode, so its output for an example never changes: we
capture the input of the model's own head (for BERT-like models the pooled [CLS] vector, after
the pooler) once for every training and evaluation example, and every step after that costs only
the head. The trained head lives inside the full model, so `final/` is still a plain Hugging Face
folder. Models whose head reads every position (Llama-like `score`) are not cached: they train
with the frozen backbone run each step.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from tunelab.device import model_device, to_device
from tunelab.evaluate.classification import classification_metrics
from tunelab.train.protocols import TaskRun
from tunelab.models.anatomy import head_modules_with_params

log = logging.getLogger("tunelab")


def head_module(model: torch.nn.Module) -> torch.nn.Module:
    heads = head_modules_with_params(model)
    if len(heads) != 1:
        raise ValueError(f"expected one head module with parameters, found {heads}")
    return model.get_submodule(heads[0])


@torch.no_grad()
def head_inputs(model: torch.nn.Module, batches) -> torch.Tensor | None:
    """The tensor the head receives, for every example of `batches`, in order; None if not 2-D."""
    head = head_module(model)
    captured: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda mod, args: captured.append(args[0].detach().float()))
    was_training = model.training
    model.eval()
    try:
        device = model_device(model)
        for batch in batches:
            model(**{k: v for k, v in to_device(batch, device).items() if k != "labels"})
            if captured[-1].dim() != 2:
                return None
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat(captured)


def cache_features(task: TaskRun, model: torch.nn.Module, eval_batches, batch_size: int) -> TaskRun:
    """A new TaskRun whose batches are cached head inputs (every other field carried, the replay
    schedule included); `task` itself when the head cannot be cached."""
    n = len(task.train.lengths)
    order = list(range(n))
    train_batches = [task.train.collate(order[i : i + batch_size]) for i in range(0, n, batch_size)]
    feats = head_inputs(model, train_batches)
    if feats is None:
        log.warning("feature_extraction: this model's head reads every position; features are not cached")
        return task
    labels = torch.cat([b["labels"] for b in train_batches])
    eval_feats = eval_labels = None
    if eval_batches is not None:
        eval_batches = list(eval_batches)
        eval_feats = head_inputs(model, eval_batches)
        eval_labels = torch.cat([b["labels"] for b in eval_batches])
    head = head_module(model)
    names = task.info["labels"]

    def collate(idx: list[int]) -> dict:
        return {"features": feats[idx], "labels": labels[idx], "num_tokens": torch.tensor(0)}

    def loss_fn(_model, batch) -> tuple[torch.Tensor, int]:
        logits = head(batch["features"]).float()
        return torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum"), batch["labels"].numel()

    def evaluate(_model) -> dict:
        with torch.no_grad():
            logits = head(eval_feats).float()
        metrics = classification_metrics(logits.argmax(-1).tolist(), eval_labels.tolist(), names)
        metrics["loss"] = torch.nn.functional.cross_entropy(logits, eval_labels).item()
        return metrics

    # same lengths (and epoch schedule) as the token batches, so the epoch order is the same
    shapes = {"train": list(feats.shape), "eval": list(eval_feats.shape) if eval_feats is not None else None}
    return replace(task, train=replace(task.train, collate=collate, count=len), loss_fn=loss_fn,
                   evaluate=evaluate if eval_feats is not None else task.evaluate,
                   info={**task.info, "feature_cache": shapes})
