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
from tunelab.models.anatomy import head_modules_with_params
from tunelab.tasks.classification import metrics_of_parts
from tunelab.train.protocols import TaskRun

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
    evals = {}  # {eval source name: (head inputs, labels)}
    for name, batches in _by_source(eval_batches).items():
        batches = list(batches)
        evals[name] = (head_inputs(model, batches), torch.cat([b["labels"] for b in batches]))
    head = head_module(model)
    names = task.info["labels"]

    def collate(idx: list[int]) -> dict:
        return {"features": feats[idx], "labels": labels[idx], "num_tokens": torch.tensor(0)}

    def loss_fn(_model, batch) -> tuple[torch.Tensor, int]:
        logits = head(batch["features"]).float()
        return torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum"), batch["labels"].numel()

    def evaluate(_model) -> dict:
        parts = {}
        with torch.no_grad():
            for name, (x, y) in evals.items():
                logits = head(x).float()
                loss = torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
                parts[name] = (loss, logits.argmax(-1).tolist(), y.tolist())
        return metrics_of_parts(parts, names)

    # same lengths (and epoch schedule) as the token batches, so the epoch order is the same
    eval_rows = sum(int(x.shape[0]) for x, _ in evals.values())
    shapes = {"train": list(feats.shape), "eval": [eval_rows, int(feats.shape[1])] if evals else None}
    return replace(task, train=replace(task.train, collate=collate, count=len), loss_fn=loss_fn,
                   evaluate=evaluate if evals else task.evaluate, info={**task.info, "feature_cache": shapes})


def _by_source(eval_batches) -> dict:
    """{eval source name: batches}: a task's eval_batches() as it gives them (a dict per source), or
    one iterable of batches (the one unnamed eval set, '')."""
    if eval_batches is None:
        return {}
    return dict(eval_batches) if isinstance(eval_batches, dict) else {"": eval_batches}
