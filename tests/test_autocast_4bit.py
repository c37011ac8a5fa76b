"""QLoRA's 4-bit layers keep autocast's bf16 output (models/autocast_4bit.py, lora.base_dtype auto).

The independent reference: LoRA on a plain model whose base Linear weights are the dequantised NF4
values (read back through the 4-bit layer itself as layer(identity), exact in bf16), same adapters,
same batch. Under bf16 autocast the QLoRA model with Linear4bitAutocast gives bit-identical logits,
loss and adapter gradients; bitsandbytes' own layer upcasts to fp32 and saves more for backward."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("bitsandbytes")

from tiny_models import tiny_llama_folder  # noqa: E402

from tunelab.config import LoraConfig  # noqa: E402
from tunelab.models.adapters import apply_lora  # noqa: E402

pytestmark = pytest.mark.unit


def _load(folder, quantized: bool):
    from transformers import AutoModelForCausalLM

    from tunelab.models.quantization import nf4_config

    kw = {"quantization_config": nf4_config()} if quantized else {}
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw)


def _lora(model, method):
    model = apply_lora(model, LoraConfig(r=4, dropout=0.0, base_dtype="auto"), method=method)
    torch.manual_seed(1)
    for n, p in model.named_parameters():  # lora_B starts at zero: give the adapters a real path
        if "lora_B" in n:
            p.data.normal_(0, 0.5)
    return model


def _four_bit_layers(model):
    from bitsandbytes.nn import Linear4bit

    return {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}


def _step(model, ids):
    model.zero_grad(set_to_none=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads, sum(saved)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from tunelab.models.autocast_4bit import Linear4bitAutocast, keep_autocast_dtype

    folder = tiny_llama_folder(tmp_path_factory.mktemp("llama"))
    q_own = _lora(_load(folder, quantized=True), "qlora")
    q_auto = copy.deepcopy(q_own)
    assert keep_autocast_dtype(q_auto) == len(_four_bit_layers(q_own)) == 2 * 7  # q k v o gate up down, 2 layers
    assert all(type(m) is Linear4bitAutocast for m in _four_bit_layers(q_auto).values())

    # the reference: plain Linear layers holding what the 4-bit ones compute with
    ref = _load(folder, quantized=False)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for name, layer in _four_bit_layers(q_auto).items():
            eye = torch.eye(layer.in_features, dtype=torch.bfloat16)
            w_t = layer(eye)  # I @ W^T: each value one product with 1.0, exact
            assert w_t.dtype == torch.bfloat16
            plain = ref.get_submodule(name.replace("base_model.model.", "").replace(".base_layer", ""))
            plain.weight.data = w_t.t().float().contiguous()
    ref = _lora(ref, "lora")
    ref.load_state_dict({k: v for k, v in q_auto.state_dict().items() if "lora_" in k}, strict=False)
    return q_own, q_auto, ref


def test_qlora_under_autocast_equals_lora_on_the_dequantised_base_bit_for_bit(models):
    q_own, q_auto, ref = models
    ids = torch.randint(3, 250, (2, 24), generator=torch.Generator().manual_seed(0))
    logits, loss, grads, _ = _step(q_auto, ids)
    r_logits, r_loss, r_grads, _ = _step(ref, ids)
    assert torch.equal(loss, r_loss)
    assert torch.equal(logits, r_logits)
    lora = {n for n in grads if "lora_" in n}
    assert lora and lora == {n for n in r_grads if "lora_" in n}
    for n in lora:
        assert torch.equal(grads[n], r_grads[n]), n


def test_bitsandbytes_own_layer_upcasts_and_saves_more(models):
    q_own, q_auto, _ = models
    ids = torch.randint(3, 250, (2, 24), generator=torch.Generator().manual_seed(0))
    layer_own = _four_bit_layers(q_own)["base_model.model.model.layers.0.self_attn.q_proj.base_layer"]
    layer_auto = _four_bit_layers(q_auto)["base_model.model.model.layers.0.self_attn.q_proj.base_layer"]
    x = torch.randn(5, layer_own.in_features)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        own, auto = layer_own(x), layer_auto(x)
    assert own.dtype == torch.float32 and auto.dtype == torch.bfloat16
    assert torch.equal(own, auto.float())  # the upcast adds no information
    with torch.no_grad():  # outside autocast the layer is bitsandbytes' own
        assert torch.equal(layer_own(x), layer_auto(x))
    _, loss_own, _, saved_own = _step(q_own, ids)
    _, loss_auto, _, saved_auto = _step(q_auto, ids)
    assert saved_auto < 0.9 * saved_own
    assert abs(loss_own.item() - loss_auto.item()) < 0.05  # bf16 rounding of the sums, nothing more


def test_the_run_applies_it_for_qlora_under_bf16_only(models):
    from bitsandbytes.nn import Linear4bit

    from tunelab.config import Config
    from tunelab.models.autocast_4bit import Linear4bitAutocast
    from tunelab.run import store_frozen_base

    q_own = models[0]
    raw = {"task": "causal_lm", "model": {"name": "x"}, "data": {"train": "t.jsonl"}, "method": "qlora"}
    for base_dtype, precision, kind in (("auto", "bf16", Linear4bitAutocast), ("fp32", "bf16", Linear4bit),
                                        ("auto", "fp32", Linear4bit)):
        model = copy.deepcopy(q_own)
        store_frozen_base(Config.model_validate({**raw, "lora": {"base_dtype": base_dtype}}), model, precision,
                          quiet=True)
        assert {type(m) for m in _four_bit_layers(model).values()} == {kind}, (base_dtype, precision)
