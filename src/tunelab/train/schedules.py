"""Learning-rate schedules as plain functions of the step, wrapped in torch's LambdaLR.

Written out (not taken from transformers' `get_*_schedule_with_warmup`) so that every schedule
shares one warmup rule, WSD exists, `min_lr_ratio` works for all of them, and a test can check
values at chosen steps against the formulas in this docstring:

    warmup (step < W):   f = (step + 1) / W          (no wasted step at lr 0)
    after warmup, with p = (step - W) / (T - W) in [0, 1):
    constant:            f = 1
    linear:              f = m + (1 - m) * (1 - p)
    cosine:              f = m + (1 - m) * (1 + cos(pi * p)) / 2
    wsd:                 f = 1 until step >= T - D, then m + (1 - m) * (1 - (step - (T - D)) / D)
                         with D = max(1, round(decay_ratio * T)) decay steps

T is the number of optimizer steps, m the min-lr ratio; lr = base_lr * f per parameter group.
"""

from __future__ import annotations

import math

import torch


def warmup_steps_for(total_steps: int, warmup_ratio: float | None, warmup_steps: int | None) -> int:
    if warmup_steps is not None:
        return min(warmup_steps, total_steps)
    return min(math.ceil((warmup_ratio or 0.0) * total_steps), total_steps)


def lr_factor(
    step: int,
    *,
    name: str,
    total_steps: int,
    warmup_steps: int,
    min_lr_ratio: float = 0.0,
    decay_ratio: float = 0.1,
) -> float:
    """Multiplier of the base lr for the optimizer step numbered `step` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    m = min_lr_ratio
    if name == "constant":
        return 1.0
    if name == "wsd":
        decay = max(1, round(decay_ratio * total_steps))
        start = total_steps - decay
        if step < start:
            return 1.0
        return m + (1 - m) * max(0.0, 1 - (step - start) / decay)
    p = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if name == "linear":
        return m + (1 - m) * (1 - p)
    if name == "cosine":
        return m + (1 - m) * 0.5 * (1 + math.cos(math.pi * p))
    raise ValueError(f"unknown schedule {name!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, *, total_steps: int, name: str, warmup_ratio=None,
                    warmup_steps=None, min_lr_ratio: float = 0.0, decay_ratio: float = 0.1):
    warm = warmup_steps_for(total_steps, warmup_ratio, warmup_steps)

    def factor(step: int) -> float:
        return lr_factor(step, name=name, total_steps=total_steps, warmup_steps=warm,
                         min_lr_ratio=min_lr_ratio, decay_ratio=decay_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
