"""`tunelab plan --nproc N` under distributed.strategy fsdp / zero1-3 (issue 12): each process's
planned model states are the strategy's cut of the whole (the shares tests/test_sharding.py reads
from the tensors each real process holds), and the peak drops by what the cut frees."""

from __future__ import annotations

import copy

import pytest

from tunelab.config import Config
from tunelab.plan import planner

pytestmark = pytest.mark.unit

MB = 2**20


@pytest.mark.parametrize("strategy,shares,optimizer_copies", [
    # (weights, gradients, optimizer state) per process as a share of one fp32 copy each, N = 2
    ("fsdp", (0.5, 0.5, 0.5), 2),  # FSDP2: fp32 shards of weights, gradients and AdamW's 2 moments
    ("zero1", (1.0, 1.0, 0.5), 3),  # DeepSpeed: fp32 master + 2 moments partitioned
    ("zero2", (1.0, 0.5, 0.5), 3),
    ("zero3", (0.5, 0.5, 0.5), 3),
])
def test_each_process_plans_its_share_of_the_model_states(toy_classification, strategy, shares, optimizer_copies):
    raw = copy.deepcopy(toy_classification["config"])
    one = planner.make_plan(Config.model_validate(raw), suggestions=False)
    raw["distributed"] = {"strategy": strategy}
    two = planner.make_plan(Config.model_validate(raw), suggestions=False, nproc=2)
    p = 4 * one["params"]["trainable_params"]  # one fp32 copy (the toy model trains every parameter)
    assert one["params"]["trainable_params"] == one["params"]["total_params"]
    got = two["per_process_states"]
    whole = (p, p, optimizer_copies * p)
    for key, w, share in zip(("weights", "gradients", "optimizer"), whole, shares):
        assert got[key] == pytest.approx(w * share), (strategy, key)
    assert two["strategy"] == strategy and "ddp_buckets" not in two["memory_mb"]
    freed = sum(one["per_process_states"].values()) - sum(got.values())
    buffers = two["memory_mb"]["sharding_buffers"]
    # (the runtime baseline is this process's RSS at each call: compare without it)
    assert two["memory_mb"]["peak"] - two["memory_mb"]["runtime"] == pytest.approx(
        one["memory_mb"]["peak"] - one["memory_mb"]["runtime"] - freed / MB + buffers, abs=0.3)
