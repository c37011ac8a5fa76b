"""EWC's Fisher: the mean over examples of the squared per-example gradient, whatever the batch size.

The reference is computed here independently: one `torch.autograd.grad` per example of that
example's own loss (micro-batches of one), squared and averaged. Before the fix the estimate was
the squared gradient of each batch's mean loss, which shrinks as the batch grows (the per-example
gradients partly cancel): one `regularization.ewc` meant a different penalty at every batch size.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tunelab.config import Config
from tunelab.train.regularizers import anchored_params, estimate_fisher

pytestmark = pytest.mark.parity


def per_example_reference(model, params: dict, examples: list[dict], loss_fn) -> dict:
    """mean_i (d loss_i / d w)^2 with loss_i the mean loss of example i alone."""
    names = list(params)
    out = {n: torch.zeros_like(p) for n, p in params.items()}
    model.eval()
    for ex in examples:
        loss_sum, count = loss_fn(model, ex)
        grads = torch.autograd.grad(loss_sum / count, [params[n] for n in names], allow_unused=True)
        for n, g in zip(names, grads):
            if g is not None:
                out[n] += g.detach() ** 2
    return {n: f / len(examples) for n, f in out.items()}


def test_linear_fisher_is_the_mean_of_per_example_squared_gradients():
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 1, bias=False)
    x, y = torch.randn(12, 3), torch.randn(12)

    def loss_fn(model, b):
        return ((model(b["x"]).squeeze(-1) - b["y"]) ** 2).sum(), len(b["y"])

    w = lin.weight.detach()
    resid = x @ w.T - y[:, None]  # d/dw (x_i w - y_i)^2 = 2 (x_i w - y_i) x_i, per example
    by_hand = ((2 * resid * x) ** 2).mean(0, keepdim=True)
    for bs in (1, 4, 12):
        batches = [{"x": x[i : i + bs], "y": y[i : i + bs]} for i in range(0, 12, bs)]
        fisher = estimate_fisher(lin, {"weight": lin.weight}, batches, loss_fn)
        assert torch.allclose(fisher["weight"], by_hand, rtol=1e-5, atol=1e-7), bs


def test_classifier_fisher_is_the_same_at_every_batch_size(toy_classification):
    from tunelab.compose import setup_task
    from tunelab.tasks.classification import classification_loss

    raw = copy.deepcopy(toy_classification["config"])
    task = setup_task(Config.model_validate(raw))
    model = task.model
    params = anchored_params(model)
    n = 48
    reference = per_example_reference(model, params, [task.train.collate([i]) for i in range(n)], classification_loss)
    ref_total = sum(float(f.sum()) for f in reference.values())
    assert ref_total > 0
    for bs in (1, 4, 16, 48):
        batches = [task.train.collate(list(range(i, min(n, i + bs)))) for i in range(0, n, bs)]
        fisher = estimate_fisher(model, params, batches, classification_loss)
        total = sum(float(f.sum()) for f in fisher.values())
        assert total == pytest.approx(ref_total, rel=1e-4), bs
        for name in params:
            assert torch.allclose(fisher[name], reference[name], rtol=1e-3, atol=1e-9), (bs, name)


def test_the_run_builds_the_same_penalty_at_batch_sizes_4_and_16(toy_classification):
    """Through run.setup: the Fisher over all 64 training rows, cut into batches of 4 or of 16."""
    from tunelab.run import setup

    def fisher_total(bs: int) -> float:
        raw = copy.deepcopy(toy_classification["config"])
        raw["train"]["batch_size"] = bs
        raw["regularization"] = {"ewc": 1.0, "ewc_batches": 64 // bs}
        r = setup(Config.model_validate(raw))
        # the penalty at w0 + 1 on every anchored weight is ewc/2 * sum(F): the Fisher's total
        with torch.no_grad():
            for p in anchored_params(r.model).values():
                p.add_(1.0)
        return float(r.settings.penalty(r.model).detach()) * 2

    small, large = fisher_total(4), fisher_total(16)
    assert small > 0 and large == pytest.approx(small, rel=1e-3)
