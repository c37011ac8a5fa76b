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
    return loss.item(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


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


def _lora(model, recompute_inputs: bool = True):
    from peft import LoraConfig, get_peft_model

    from tunelab.models.lora_dropout import lean_lora_dropout

    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2, target_modules="all-linear"))
    for n, p in model.named_parameters():
        if "lora_B" in n:  # a nonzero B lets every gradient through the adapters
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(len(n)))
    lean_lora_dropout(model, recompute_inputs=recompute_inputs)
    return model


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("adapters", [False, True])
def test_recomputed_gated_activation_bit_identical(autocast, adapters):
    from tunelab.models.recompute import recompute_gated_activations

    ids = torch.randint(3, 400, (2, 40), generator=torch.Generator().manual_seed(0))
    build = (lambda: _lora(tiny_llama_build(400))) if adapters else (lambda: tiny_llama_build(400))
    ref_model, model = build(), build()
    torch.manual_seed(7)  # LoRA dropout draws its masks in the same order on both sides
    ref_loss, ref = _step(ref_model, ids, autocast)
    assert recompute_gated_activations(model) == 2  # one MLP per layer
    assert recompute_gated_activations(model) == 0  # once only
    torch.manual_seed(7)
    loss, grads = _step(model, ids, autocast)
    assert loss == ref_loss
    assert grads.keys() == ref.keys() and (not adapters or all("lora_" in k for k in grads))
    for k in ref:
        assert torch.equal(grads[k], ref[k]), k
    assert list(model.state_dict()) == list(build().state_dict())


def test_recomputed_gated_activation_drops_exactly_act_gate():
    from tunelab.models.recompute import recompute_gated_activations

    ids = torch.randint(3, 400, (2, 64), generator=torch.Generator().manual_seed(1))
    plain = _saved_bytes(tiny_llama_build(400).train(), ids)
    model = tiny_llama_build(400).train()
    recompute_gated_activations(model)
    # SiLU's output, (2 x 64 tokens, intermediate 64) fp32, per layer, is what backward no longer keeps
    assert plain - _saved_bytes(model, ids) == 2 * (2 * 64 * 64 * 4)


def test_only_mlps_written_as_llamas_are_changed():
    from torch import nn

    from tunelab.models.recompute import is_gated_mlp, recompute_gated_activations

    class OtherMLP(nn.Module):  # the same attributes, another expression: left alone
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(8, 4)
            self.act_fn = nn.GELU()

        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) + self.up_proj(x))

    assert not is_gated_mlp(OtherMLP()) and recompute_gated_activations(nn.Sequential(OtherMLP())) == 0
    assert is_gated_mlp(tiny_llama_build(50).model.layers[0].mlp)


@pytest.mark.parametrize("autocast", [False, True])
def test_recomputed_lora_inputs_bit_identical_and_not_kept(autocast):
    """lora.recompute_inputs: lora_A makes its input (a recomputed norm's output, the gated product)
    again in backward. The same loss and gradients as keeping it, and exactly those tensors fewer kept:
    per layer two norm outputs (tokens x hidden, fp32: the residual stream's dtype; not the first
    layer's first) and the product (tokens x intermediate, in the compute dtype)."""
    from tunelab.models.recompute import recompute_gated_activations

    ids = torch.randint(3, 400, (2, 40), generator=torch.Generator().manual_seed(0))

    def build(again: bool):
        model = _lora(tiny_llama_build(400), recompute_inputs=again)
        recompute_norms(model)
        recompute_gated_activations(model)
        return model

    kept, again = build(False), build(True)
    torch.manual_seed(7)
    ref_loss, ref = _step(kept, ids, autocast)
    torch.manual_seed(7)
    loss, grads = _step(again, ids, autocast)
    assert loss == ref_loss and grads.keys() == ref.keys()
    for k in ref:
        assert torch.equal(grads[k], ref[k]), k

    def saved(model):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            torch.manual_seed(7)
            return _saved_bytes(model, ids)

    # layer 0's first norm reads the frozen embedding and has a frozen weight: nothing of it needs
    # backward, so it is not checkpointed and its output (kept by q/k/v's lora_A) is not recomputed
    tokens, compute = 2 * 40, 2 if autocast else 4
    assert saved(kept) - saved(again) == tokens * (3 * 32 * 4 + 2 * 64 * compute)


def test_a_recomputed_input_is_made_once_for_its_readers_and_then_let_go():
    from tunelab.models.recompute import Recomputable

    calls = []

    def make(x):
        calls.append(1)
        return x * 2

    x = torch.ones(3)
    again = Recomputable(make, (x,), {}, "cpu")
    again.claim(), again.claim(), again.claim()  # q, k and v read one norm output
    assert [torch.equal(again.get(), x * 2) for _ in range(3)] == [True] * 3
    assert len(calls) == 1 and again.args is None  # made once; its inputs go with the last reader
    with pytest.raises(RuntimeError, match="recompute_inputs"):
        again.get()


def test_hub_kernels_do_not_undo_recomputation_on_train(tmp_path):
    """transformers 5.25 turns hub kernels on by default; `model.train()` then re-kernelizes and resets
    the RMSNorms' forward. tunelab's loader switches them off (models/load.py NO_HUB_KERNELS)."""
    from tiny_models import tiny_llama_folder

    from tunelab.models.load import load_causal_lm
    from tunelab.models.registry import resolve_model

    model = load_causal_lm(resolve_model(str(tiny_llama_folder(tmp_path / "m"))))
    n = recompute_norms(model)
    model.train()
    model.eval()
    model.train()
    assert n == 5 and recompute_norms(model) == 0  # every norm still recomputes: none to do again
