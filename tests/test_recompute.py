"""models/recompute.py: recomputed RMSNorms give bit-identical losses and gradients, and keep less."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama_build

from tunelab.models.recompute import recompute_norms

pytestmark = [pytest.mark.parity, pytest.mark.usefixtures("one_torch_thread")]


def _step(model, ids, autocast: bool):
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {k: p.grad.clone() for k, p in model.named_parameters()}


def _saved_bytes(model, ids) -> int:
    seen = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids).loss
    return sum(seen.values())


@pytest.mark.parametrize("autocast", [False, True])
def test_recomputed_norms_bit_identical(autocast):
    ids = torch.randint(3, 400, (2, 40), generator=torch.Generator().manual_seed(0))
    ref_loss, ref = _step(tiny_llama_build(400), ids, autocast)
    model = tiny_llama_build(400)
    assert recompute_norms(model) == 2 * 2 + 1  # two per layer and the final norm
    assert recompute_norms(model) == 0  # once only
    loss, grads = _step(model, ids, autocast)
    assert loss == ref_loss
    for k in ref:
        assert torch.equal(grads[k], ref[k]), k
    assert list(model.state_dict()) == list(tiny_llama_build(400).state_dict())


def test_recomputed_norms_keep_less_for_backward():
    ids = torch.randint(3, 400, (2, 64), generator=torch.Generator().manual_seed(1))
    plain = _saved_bytes(tiny_llama_build(400).train(), ids)
    model = tiny_llama_build(400).train()
    recompute_norms(model)
    assert _saved_bytes(model, ids) < plain
