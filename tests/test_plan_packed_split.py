"""`tunelab plan CONFIG` with data.packing and train.packed_attention `split`: the fake-tensor probe
runs the mask path only, and the plan says so, with the formula's difference (plan.memory.packed_terms)."""

from __future__ import annotations

import pytest

from conftest import write_jsonl
from tunelab.config import Config
from tunelab.plan import planner
from tunelab.plan.arch import shape_of
from tunelab.plan.memory import packed_terms

pytestmark = pytest.mark.unit


def test_split_is_said_to_be_planned_as_mask(tmp_path):
    from tiny_models import conversations, tiny_llama_folder

    llama = tiny_llama_folder(tmp_path / "llama")
    write_jsonl(tmp_path / "chat.jsonl", conversations(12))
    raw = {"task": "chat", "model": {"name": str(llama), "max_length": 48},
           "data": {"train": str(tmp_path / "chat.jsonl"), "eval_split": 0.0, "packing": True},
           "train": {"batch_size": 2, "max_steps": 2, "packed_attention": "split"}, "early_stopping": {"enabled": False}}
    plan = planner.make_plan(Config.model_validate(raw), suggestions=False)
    note = plan["packed_attention"]
    assert note["configured"] == "split" and note["planned_as"] == "mask" and "cannot run split" in note["note"]
    from transformers import AutoConfig

    shape = shape_of(AutoConfig.from_pretrained(llama), "chat")
    big = plan["largest_micro_batch"]
    act = 4  # fp32 on the CPU
    (m_layer, m_once), (s_layer, s_once) = (packed_terms(shape, big["width"], big["rows"], packed=k, attention="sdpa",
                                                         act_bytes=act) for k in ("mask", "split"))
    # by hand: fp32 mask once (4 b L^2, no 16-bit casts), split one more attention output per layer
    assert (m_layer, m_once) == (0, 4 * big["rows"] * big["width"] ** 2)
    assert s_layer == act * big["width"] * big["rows"] * shape.heads * shape.head_dim and s_once == 0
    want = shape.layers * (m_layer - s_layer) + m_once - s_once
    assert note["mask_minus_split_bytes"] == want != 0  # (at 64 tokens this model's two terms are equal)
    raw["train"]["packed_attention"] = "mask"
    assert planner.make_plan(Config.model_validate(raw), suggestions=False)["packed_attention"] == {
        "configured": "mask", "planned_as": "mask"}
