"""The run's derived sizes, each defined once: optimizer steps, the eval batch, the usable max length.

The recipe (tunelab.run), the tasks and the planner (tunelab.plan) all need them; a second copy is
how a plan came to use another length or step count than the training it plans.
"""

from __future__ import annotations

import math


def total_steps(windows_per_epoch: int, epochs: float, max_steps: int | None) -> int:
    """Optimizer steps of the run: `train.max_steps`, else `train.epochs` epochs of accumulation windows."""
    return max_steps or max(1, math.ceil(epochs * windows_per_epoch))


def eval_batch_size(train_cfg) -> int:
    """`train.eval_batch_size`, else twice the training micro-batch (no gradients, no optimizer state)."""
    return train_cfg.eval_batch_size or 2 * train_cfg.batch_size


def usable_max_length(requested: int, model_config) -> int:
    """`model.max_length` clamped to the model's positions (`max_position_embeddings`, where it says)."""
    return min(requested, getattr(model_config, "max_position_embeddings", None) or requested)
