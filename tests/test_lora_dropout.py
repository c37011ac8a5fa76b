"""lora.lean_dropout (models/lora_dropout.py): peft's LoRA numbers with a bit-packed mask saved instead
of the fp32 noise and the dropped copy. The reference is peft's own layer, same weights, same seed; the
packing's is numpy.packbits."""

from __future__ import annotations

import copy
import json
import sys

import numpy as np
import pytest
import torch
from torch import nn

pytestmark = pytest.mark.unit


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(24, 16)
        self.up = nn.Linear(24, 40)
        self.down = nn.Linear(40, 24)

    def forward(self, x):
        return self.down(torch.relu(self.up(x))) + self.q(x).sum(-1, keepdim=True)


def _pair(dropout=0.3, dora=False):
    from peft import LoraConfig, get_peft_model

    from tunelab.models.lora_dropout import lean_lora_dropout

    torch.manual_seed(0)
    peft_model = get_peft_model(Block(), LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, use_dora=dora,
                                                    target_modules=["q", "up", "down"]))
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:  # peft starts B at zero; a nonzero B lets every gradient through
            nn.init.normal_(p, std=0.2)
    lean = copy.deepcopy(peft_model)
    return peft_model, lean, lean_lora_dropout(lean)


def _step(model, x, seed, autocast=False):
    model.train()
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
    (out.float() ** 2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), x.grad.clone(), grads


@pytest.mark.parametrize("autocast", [False, True])
def test_same_masks_output_and_gradients_as_peft(autocast):
    peft_model, lean, folded = _pair()
    assert folded == 3
    x = torch.randn(3, 7, 24)
    a, b = _step(peft_model, x, 5, autocast), _step(lean, x, 5, autocast)
    assert torch.equal(a[0], b[0])
    torch.testing.assert_close(a[1], b[1], rtol=1e-6, atol=1e-7)
    assert a[2].keys() == b[2].keys() and any("lora_A" in n for n in a[2])
    for n in a[2]:
        torch.testing.assert_close(a[2][n], b[2][n], rtol=1e-6, atol=1e-7, msg=n)
    # dropout really ran (another seed, another output), and eval mode is the plain adapter
    assert not torch.equal(_step(lean, x, 6, autocast)[0], b[0])
    peft_model.eval(), lean.eval()
    with torch.no_grad():
        assert torch.equal(peft_model(x), lean(x))


def test_it_saves_a_mask_not_the_noise_and_the_copy():
    peft_model, lean, _ = _pair()
    x = torch.randn(4, 32, 24, requires_grad=True)  # as hidden states do: dropout keeps its noise only then

    def saved_bytes(model):
        seen = {}

        def pack(t):
            if not isinstance(t, nn.Parameter):
                seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            return t

        model.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                model(x)
        return sum(seen.values())

    ours, theirs = saved_bytes(lean), saved_bytes(peft_model)
    values = 4 * 32 * (24 + 24 + 40)  # the three adapted inputs
    # peft: fp32 noise + the bf16 dropped copy (6 bytes a value); lean: a 1-bit mask, and the fp32 input
    # of q and up kept once (peft's base layers keep bf16 copies of it instead): at least the noise saved
    assert theirs - ours >= 0.9 * 4 * values, (theirs, ours)


def _masks():
    g = torch.Generator().manual_seed(3)
    for shape in [(1,), (7,), (9,), (1000003,), (3, 5, 7), (2, 9, 13)]:
        yield torch.rand(shape, generator=g) < 0.7
    base = torch.rand(6, 10, 12, generator=g) < 0.5
    yield base.transpose(0, 2)  # non-contiguous
    yield base[:, 1::3, 2:]  # strided
    yield base.reshape(-1)[3:700]  # contiguous from an odd offset
    yield torch.zeros(0, 4, dtype=torch.bool)


def test_pack_and_unpack_mask_match_numpy_packbits():
    from tunelab.models.lora_dropout import pack_mask, unpack_mask

    for mask in _masks():
        ref = np.packbits(mask.numpy().reshape(-1), bitorder="little")
        packed = pack_mask(mask)
        assert packed.dtype == torch.uint8 and packed.numel() == -(-mask.numel() // 8)
        assert np.array_equal(packed.numpy(), ref), mask.shape
        back = unpack_mask(packed, mask.shape)
        assert back.dtype == torch.bool and back.shape == mask.shape and back.is_contiguous()
        assert torch.equal(back, mask), mask.shape
        assert np.array_equal(back.numpy().reshape(-1), np.unpackbits(ref, count=mask.numel(), bitorder="little"))


def test_the_big_endian_constant_packs_as_the_little_endian_one():
    """On a big-endian machine byte j of an int64 word is bits 8(7 - j): read the same bytes that way."""
    from tunelab.models.lora_dropout import _PACK_MAGIC, _pack_words

    assert sys.byteorder in _PACK_MAGIC
    values = (np.random.default_rng(0).random(8 * 4099) < 0.4).astype(np.uint8)
    ref = np.packbits(values, bitorder="little")
    for order, dtype in (("little", "<i8"), ("big", ">i8")):
        words = torch.from_numpy(values.view(dtype).astype(np.int64))
        assert np.array_equal(_pack_words(words, _PACK_MAGIC[order]).numpy(), ref), order


@pytest.mark.parametrize("shape", [(4, 33, 24), (5, 24)])
def test_backward_keeps_an_eighth_of_a_byte_per_mask_value(shape):
    from tunelab.models.lora_dropout import _DroppedLinear

    x = torch.randn(shape, requires_grad=True)
    w = nn.Parameter(torch.randn(6, 24))
    saved = []

    def pack(t):
        if not isinstance(t, nn.Parameter) and t is not x:
            saved.append((t.dtype, t.untyped_storage().nbytes()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _DroppedLinear.apply(x, w, 0.3)
    assert saved == [(torch.uint8, -(-x.numel() // 8))]


@pytest.mark.parametrize("autocast", [False, True])
def test_the_mask_rebuilt_in_backward_is_the_drawn_one(autocast):
    """With an identity weight and a ones gradient, the input gradient is the noise itself: the bits
    unpacked in backward must be torch's draw for the seed, on a non-contiguous odd-sized input too."""
    from tunelab.models.lora_dropout import _DroppedLinear

    x = torch.randn(3, 11, 7).transpose(0, 1).requires_grad_(True)
    torch.manual_seed(2)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = _DroppedLinear.apply(x, nn.Parameter(torch.eye(7)), 0.4)
    out.float().sum().backward()
    torch.manual_seed(2)
    noise = torch.empty_like(x).bernoulli_(0.6).div_(0.6)
    assert torch.equal(x.grad, noise) and (noise == 0).any() and (noise != 0).any()

def test_dora_and_no_dropout_keep_peft_layers():
    from tunelab.models.lora_dropout import DroppedInputLinear

    for kw in ({"dropout": 0.0}, {"dora": True}):
        _, lean, folded = _pair(**kw)
        assert folded == 0 and not any(isinstance(m, DroppedInputLinear) for m in lean.modules())


@pytest.mark.e2e
def test_a_lora_run_has_peft_dropouts_losses_and_adapter_keys(tmp_path):
    from safetensors.torch import load_file
    from tiny_models import conversations, tiny_llama_folder

    from tunelab.config import Config
    from tunelab.monitor.metrics_log import read_metrics
    from tunelab.run import run_training

    model = tiny_llama_folder(tmp_path / "model")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in conversations(16)), encoding="utf-8")
    runs = {}
    for lean in (True, False):
        raw = {"task": "chat", "model": {"name": str(model), "max_length": 64}, "method": "lora",
               "lora": {"dropout": 0.1, "lean_dropout": lean},
               "data": {"train": str(data), "eval_split": 0, "packing": True, "cache": False},
               "optim": {"lr": 3e-3}, "schedule": {"name": "constant", "warmup_steps": 0},
               "train": {"max_steps": 6, "batch_size": 2, "log_every": 1, "seed": 1, "eval_before": False,
                         "precision": "fp32"},
               "checkpoint": {"final": "last", "keep_last": 1}, "early_stopping": {"enabled": False},
               "eval": {"generate": {"n": 0}}}
        out = tmp_path / f"run-{lean}"
        run_training(Config.model_validate(raw), out, show_progress=False)
        runs[lean] = ([r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r],
                      load_file(str(out / "final" / "adapter_model.safetensors")))
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-5)
    assert runs[True][1].keys() == runs[False][1].keys()
    for k in runs[True][1]:
        torch.testing.assert_close(runs[True][1][k], runs[False][1][k], rtol=1e-4, atol=1e-6)
