"""Guards against catastrophic forgetting: L2-SP, EWC and Mixout.

L2-SP (Li et al. 2018):   penalty = l2sp / 2 * sum_i (w_i - w0_i)^2
EWC (Kirkpatrick 2017):   penalty = ewc / 2 * sum_i F_i (w_i - w0_i)^2,  F = diagonal Fisher,
                          estimated as the mean over reference examples of the squared gradient
                          of each example's own loss (empirical Fisher), at the pre-trained weights
                          w0: the same F whatever the batch size the reference data is cut into.
Mixout (Lee et al. 2020): in training, each weight element is replaced by its pre-trained value
                          with probability p and the result rescaled so its expectation is w:
                          W' = (M * w0 + (1 - M) * w - p * w0) / (1 - p),  M ~ Bernoulli(p);
                          identity in eval mode.

All three act on the pre-trained backbone only: a freshly initialised head has no pre-trained
value to stay close to. Written here (not taken from a library) because none of the maintained
libraries ships them for transformers models; each is a few lines checked against its formula.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

from tunelab.device import model_device, to_device
from tunelab.models.anatomy import head_prefixes


def anchored_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable pre-trained parameters (everything but the new head), by name."""
    heads = head_prefixes(model)
    return {n: p for n, p in model.named_parameters() if p.requires_grad and not any(n.startswith(h) for h in heads)}


def snapshot(params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in params.items()}


def l2sp_penalty(params: dict[str, nn.Parameter], anchor: dict[str, torch.Tensor], weight: float) -> torch.Tensor:
    total = sum(((p - anchor[n]) ** 2).sum() for n, p in params.items())
    return 0.5 * weight * total


def ewc_penalty(params: dict[str, nn.Parameter], anchor: dict[str, torch.Tensor], fisher: dict[str, torch.Tensor],
                weight: float) -> torch.Tensor:
    total = sum((fisher[n] * (p - anchor[n]) ** 2).sum() for n, p in params.items())
    return 0.5 * weight * total


def single_rows(batch: dict) -> list[dict]:
    """The batch as micro-batches of one row each (one example, or one packed row of examples).

    Every tensor whose first dimension is the batch's is sliced; a batch-level count
    (`num_tokens`) is dropped, since the losses read labels, not it.
    """
    tensors = [v for v in batch.values() if isinstance(v, torch.Tensor) and v.dim()]
    n = len(batch["labels"]) if "labels" in batch else len(tensors[0])
    rows = []
    for i in range(n):
        rows.append({k: v[i : i + 1] if isinstance(v, torch.Tensor) and v.dim() and len(v) == n else v
                     for k, v in batch.items() if k != "num_tokens"})
    return rows


def estimate_fisher(model: nn.Module, params: dict[str, nn.Parameter], batches, loss_fn) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher: the mean over examples of (d loss_i / d w)^2, loss_i the mean loss of
    example i alone (for a packed LM row: the row's mean loss per supervised token).

    Per-example gradients, from micro-batches of one: the squared gradient of a batch's mean loss
    is not the Fisher (per-example gradients partly cancel in the mean), and shrank with the batch
    size, so one `regularization.ewc` meant a different penalty at every `train.batch_size`. Costs
    one forward and backward per reference example, once, before training. Rows without a loss
    unit (a row with no supervised token) carry no gradient and are not counted.
    """
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    was_training = model.training
    model.eval()
    n_rows = 0
    device = model_device(model)
    for batch in batches:
        for row in single_rows(batch):
            model.zero_grad(set_to_none=True)
            loss_sum, count = loss_fn(model, to_device(row, device))
            if not count:
                continue
            (loss_sum / count).backward()
            for n, p in params.items():
                if p.grad is not None:
                    fisher[n] += p.grad.detach() ** 2
            n_rows += 1
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return {n: f / max(1, n_rows) for n, f in fisher.items()}


def make_penalty(model: nn.Module, *, l2sp: float = 0.0, ewc: float = 0.0, fisher_batches=None,
                 loss_fn=None) -> Callable[[nn.Module], torch.Tensor] | None:
    """The regularizer the loop adds once per optimizer step, or None when all are off."""
    if not l2sp and not ewc:
        return None
    params = anchored_params(model)
    anchor = snapshot(params)
    fisher = estimate_fisher(model, params, fisher_batches, loss_fn) if ewc else None

    def penalty(_model: nn.Module) -> torch.Tensor:
        total = torch.zeros((), device=next(iter(params.values())).device)
        if l2sp:
            total = total + l2sp_penalty(params, anchor, l2sp)
        if ewc:
            total = total + ewc_penalty(params, anchor, fisher, ewc)
        return total

    return penalty


class Mixout(nn.Module):
    """A weight parametrization: mixout of the trained weight with its pre-trained value."""

    def __init__(self, pretrained: torch.Tensor, p: float):
        super().__init__()
        self.register_buffer("pretrained", pretrained.detach().clone(), persistent=False)
        self.p = p

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return w
        mask = torch.bernoulli(torch.full_like(w, self.p))
        return (mask * self.pretrained + (1 - mask) * w - self.p * self.pretrained) / (1 - self.p)


def apply_mixout(model: nn.Module, p: float) -> int:
    """Mixout on the weight of every pre-trained Linear layer; returns how many were wrapped."""
    heads = head_prefixes(model)
    n = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not any((name + ".").startswith(h) for h in heads) \
                and module.weight.requires_grad:
            parametrize.register_parametrization(module, "weight", Mixout(module.weight, p), unsafe=True)
            n += 1
    return n


def remove_mixout(model: nn.Module) -> None:
    """Back to plain weights (the trained values) before saving: mixout is identity at inference."""
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
