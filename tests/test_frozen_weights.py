"""lora.base_dtype (models/frozen_weights.py): the frozen base's Linear weights stored in bf16 give
the same numbers as the fp32 weights autocast casts on every call. The reference is the same model
with its fp32 weights, same batch, same seed."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from tunelab.models.frozen_weights import FrozenBf16Linear, store_frozen_linears_bf16

pytestmark = pytest.mark.unit


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 24)
        self.a = nn.Linear(24, 40)
        self.b = nn.Linear(40, 24, bias=False)
        self.train_me = nn.Linear(24, 24)
        self.head = nn.Linear(24, 50, bias=False)
        self.head.weight = self.emb.weight  # tied: must stay as it is

    def forward(self, ids):
        h = self.emb(ids)
        h = h + self.train_me(h)  # first, so the frozen layers after it carry a gradient (as a LoRA base does)
        h = h + self.b(torch.relu(self.a(h)))
        return self.head(h)


def _net(round_to_bf16: bool):
    torch.manual_seed(0)
    net = Net()
    for n, p in net.named_parameters():
        if round_to_bf16:
            p.data = p.data.to(torch.bfloat16).float()
        p.requires_grad = n.startswith("train_me")
    return net


def _step(net, ids, autocast):
    net.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = net(ids)
    out.float().logsumexp(-1).mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


def test_bf16_autocast_numbers_are_bit_identical_and_no_weight_copy_is_saved():
    ref = _net(round_to_bf16=False)
    lean = copy.deepcopy(ref)
    layers, values = store_frozen_linears_bf16(lean)
    assert layers == 2 and values == 24 * 40 + 40 * 24  # a and b; not the trained one, not the tied head
    assert type(lean.a) is FrozenBf16Linear and lean.a.weight.dtype == torch.bfloat16
    assert lean.a.bias.dtype == torch.float32 and lean.head.weight.dtype == torch.float32
    assert type(lean.train_me) is nn.Linear and lean.head.weight is lean.emb.weight
    ids = torch.randint(0, 50, (3, 11))
    (o1, g1), (o2, g2) = _step(ref, ids, True), _step(lean, ids, True)
    assert torch.equal(o1, o2)
    assert g1.keys() == g2.keys() == {"train_me.weight", "train_me.bias"}
    for n in g1:
        assert torch.equal(g1[n], g2[n]), n

    def saved(net):
        seen, params = {}, {p.untyped_storage().data_ptr() for p in net.parameters()}

        def pack(t):  # a saved view of a parameter (linear keeps weight.t()) is no activation
            if t.untyped_storage().data_ptr() not in params:
                seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                net(ids)
        return sum(seen.values())

    # autocast's per-call bf16 copies of a and b (2 bytes a value) are what backward no longer keeps
    assert saved(ref) - saved(lean) == 2 * values


def test_outside_bf16_autocast_it_computes_with_the_stored_weights_upcast():
    ref = _net(round_to_bf16=True)  # a bf16 checkpoint loaded as fp32: the upcast is exactly the loaded weight
    lean = copy.deepcopy(ref)
    assert store_frozen_linears_bf16(lean)[0] == 2
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        assert torch.equal(ref(ids), lean(ids))
        with torch.autocast("cpu", dtype=torch.float16):
            assert torch.equal(ref(ids), lean(ids))


def test_explicit_bf16_refuses_what_it_cannot_keep_exact():
    from tunelab.config import Config

    base = {"task": "chat", "model": {"name": "smollm2-135m-instruct"}, "method": "lora",
            "data": {"train": "x.jsonl"}, "train": {"precision": "bf16"}}
    cases = [({"train": {"precision": "fp32"}}, "train.precision fp32"),
             ({"lora": {"base_dtype": "bf16", "dora": True}}, "lora.dora"),
             ({"distributed": {"strategy": "fsdp"}}, "fsdp")]
    Config.model_validate({**base, "train": {}, "lora": {"base_dtype": "bf16"}})  # precision left to the defaults
    for extra, words in cases:
        raw = copy.deepcopy(base)
        raw.setdefault("lora", {})["base_dtype"] = "bf16"
        for k, v in extra.items():
            raw.setdefault(k, {}).update(v)
        with pytest.raises(Exception) as err:
            Config.model_validate(raw)
        assert "lora.base_dtype" in str(err.value) and words in str(err.value), str(err.value)


@pytest.mark.e2e
def test_a_bf16_lora_run_has_the_fp32_base_runs_losses_and_adapter(tmp_path):
    from safetensors.torch import load_file
    from tiny_models import conversations, tiny_llama_folder

    from tunelab.config import Config
    from tunelab.monitor.metrics_log import read_metrics
    from tunelab.run import run_training, setup

    model = tiny_llama_folder(tmp_path / "model")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in conversations(16)), encoding="utf-8")
    runs = {}
    for base_dtype in ("auto", "fp32"):
        raw = {"task": "chat", "model": {"name": str(model), "max_length": 64}, "method": "lora",
               "lora": {"dropout": 0.1, "base_dtype": base_dtype},
               "data": {"train": str(data), "eval_split": 0.25, "packing": True, "cache": False},
               "optim": {"lr": 3e-3}, "schedule": {"name": "constant", "warmup_steps": 0},
               "train": {"max_steps": 5, "batch_size": 2, "log_every": 1, "seed": 1, "precision": "bf16"},
               "checkpoint": {"final": "last", "keep_last": 1}, "early_stopping": {"enabled": False},
               "eval": {"generate": {"n": 0}}}
        cfg = Config.model_validate(raw)
        stored = [m for m in setup(cfg).model.modules() if isinstance(m, FrozenBf16Linear)]
        assert len(stored) == (14 if base_dtype == "auto" else 0)  # 7 projections x 2 layers; the tied head stays
        as_fp32 = Config.model_validate({**raw, "train": {**raw["train"], "precision": "fp32"}})
        assert not any(isinstance(m, FrozenBf16Linear) for m in setup(as_fp32).model.modules())  # auto steps aside
        out = tmp_path / f"run-{base_dtype}"
        run_training(cfg, out, show_progress=False)
        rows = read_metrics(out / "metrics.jsonl")
        runs[base_dtype] = ([r["loss"] for r in rows if "loss" in r],
                            [r["eval_loss"] for r in rows if "eval_loss" in r],
                            load_file(str(out / "final" / "adapter_model.safetensors")))
    assert runs["auto"][0] == runs["fp32"][0] and len(runs["auto"][0]) == 5
    assert runs["auto"][1] == runs["fp32"][1] and runs["auto"][1]
    for k in runs["fp32"][2]:
        assert torch.equal(runs["auto"][2][k], runs["fp32"][2][k]), k
