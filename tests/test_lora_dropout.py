"""lora.lean_dropout (models/lora_dropout.py): peft's LoRA numbers with a 1-byte mask saved instead of
the fp32 noise and the dropped copy. The reference is peft's own layer, same weights, same seed."""

from __future__ import annotations

import copy
import json

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
    # peft: fp32 noise + the bf16 dropped copy (6 bytes a value); lean: a 1-byte mask, and the fp32 input
    # of q and up kept once (peft's base layers keep bf16 copies of it instead): at least the noise saved
    assert theirs - ours >= 0.9 * 4 * values, (theirs, ours)


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
