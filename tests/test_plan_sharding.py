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


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_both_planners_give_each_process_the_same_bytes(method, tmp_path):
    """One definition (plan.memory.device_states): `tunelab plan CONFIG --nproc 2` (planner.shard_states
    on the configured meta model) and `tunelab plan --model ... --gpus 2` (model_plan.per_device from
    the config.json) give each process the same weights, gradients, optimizer state (master included)
    and communication buffers for every sharded strategy and precision. They had differed: FSDP2's
    gathered bf16 blocks counted at 4 bytes, ZeRO-2's reduce bucket bounded by a rank's gradient shard,
    a QLoRA base counted in fp32 under fsdp, the gathered unit one module rather than one block."""
    from transformers import LlamaConfig

    from tunelab.config import config_from_dict
    from tunelab.plan.hardware import lookup
    from tunelab.plan.memory import CUDA_CONTEXT_BYTES
    from tunelab.plan.model_plan import Model, Spec, per_device
    from tunelab.plan.probe import meta_model

    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=256).save_pretrained(tmp_path)
    strategies = ("fsdp",) if method == "qlora" else ("fsdp", "zero1", "zero2", "zero3")
    for strategy in strategies:
        for precision in ("bf16", "fp32"):
            cfg = config_from_dict({"task": "causal_lm", "method": method, "model": {"name": str(tmp_path)},
                                    "data": {"train": "t.jsonl"}, "train": {"precision": precision}})
            model = meta_model(cfg, None)
            pb = planner.param_bytes(model, cfg)
            est = {"memory": {k: pb[k] for k in ("weights", "gradients", "optimizer")} | {"peak": 0.0},
                   "params": pb, "precision": precision, "model": model, "device": "cuda"}  # GPUs, as per_device
            planner.shard_states(est, cfg, strategy, 2)
            spec = Spec(model=str(tmp_path), gpu=lookup("L4"), method=method, task="causal_lm", precision=precision,
                        strategy=strategy, gpus=2)
            d = per_device(Model(spec), spec)["per_device"]
            hardware = {"weights": d["weights_bytes"], "gradients": d["gradients_bytes"],
                        "optimizer": d["optimizer_bytes"] + d["master_weights_bytes"],
                        "sharding_buffers": d["overhead_bytes"] - CUDA_CONTEXT_BYTES}
            here = {k: round(est["memory"][k]) for k in hardware}
            assert here == hardware, (strategy, precision)
            assert here["sharding_buffers"] > 0


def test_fsdp_root_unit_is_gathered_whole_with_its_gradient_and_reduce_input():
    """FSDP2's root unit (outside the blocks: a BERT's embeddings, pooler, classifier) by hand: root_unit_params
    counts what find_blocks leaves out, fsdp_root_bytes = root * act + trainable * (act + 4), and
    device_states adds it under fsdp with N > 1 only."""
    from transformers import BertConfig, BertForSequenceClassification

    from tunelab.plan.arch import gathered_unit_params, root_unit_params
    from tunelab.plan.memory import comm_overhead, device_states, fsdp_root_bytes

    def memory_zero3(params, n, act_bytes):  # all of this small model gathered, the bucket whole (a GPU's),
        return params * act_bytes + 5e8 * act_bytes + params * (1 + 1 / n) * act_bytes + params / n * 4  # its reduce

    h, v, layers, pos = 32, 100, 2, 64
    model = BertForSequenceClassification(BertConfig(hidden_size=h, num_hidden_layers=layers, num_attention_heads=4,
                                                     intermediate_size=64, vocab_size=v, max_position_embeddings=pos))
    # embeddings (word, position, 2 token types, LayerNorm) + pooler (h x h + h) + classifier (2h + 2)
    root = (v + pos + 2) * h + 2 * h + (h * h + h) + (2 * h + 2)
    total = sum(p.numel() for p in model.parameters())
    assert root_unit_params(model) == (root, root)
    assert total - root == layers * gathered_unit_params(model)
    model.bert.embeddings.requires_grad_(False)
    assert root_unit_params(model) == (root, root - ((v + pos + 2) * h + 2 * h))
    assert fsdp_root_bytes(1000, 400, act_bytes=4) == 1000 * 4 + 400 * 8
    assert fsdp_root_bytes(1000, 400, act_bytes=2) == 1000 * 2 + 400 * 6
    unit = gathered_unit_params(model)
    for precision, act in (("fp32", 4), ("bf16", 2)):
        fsdp = device_states(total, total, precision=precision, strategy="fsdp", n=2, unit_params=unit,
                             root_params=root, root_trainable=root)
        base = comm_overhead("fsdp", grad_bytes=total * 4, largest_layer_params=unit, act_bytes=act, n=2)
        assert fsdp["buffers"] == base + root * act + root * (act + 4)
        zero3 = device_states(total, total, precision=precision, strategy="zero3", n=2, unit_params=unit,
                              root_params=root, root_trainable=root)
        # DeepSpeed: no root unit, its own gathered parameters, bucket and fp32 gradient partition
        assert zero3["buffers"] == memory_zero3(total, n=2, act_bytes=act)
        alone = device_states(total, total, precision=precision, strategy="fsdp", n=1, unit_params=unit,
                              root_params=root, root_trainable=root)
        assert alone["buffers"] == 0


def _gloo_peaks(rank: int, port: int, n: int, out) -> None:
    import os

    import torch
    import torch.distributed as dist

    def hwm_mib() -> float:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    x, shard, whole = torch.ones(n), torch.zeros(n // 2), torch.zeros(n)  # every page written up front
    dist.barrier()
    h0 = hwm_mib()
    dist.reduce_scatter_tensor(shard, x)
    dist.barrier()
    h1 = hwm_mib()
    dist.all_gather_into_tensor(whole, shard)
    dist.barrier()
    out.put((rank, h1 - h0, hwm_mib() - h1, float(shard[0]), float(whole[-1])))
    dist.destroy_process_group()


@pytest.mark.multiprocess
def test_gloo_reduce_scatter_holds_one_copy_of_its_input():
    """The premise of plan.memory.gloo_reduce_scatter_copy, measured: with input and outputs already
    resident, gloo's reduce_scatter_tensor of an n-element fp32 tensor raises a process's peak by
    about one input (4n bytes), all_gather_into_tensor by (nearly) nothing; the results are right."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    n = 8_000_000  # 30.5 MiB
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_gloo_peaks, args=(r, port, n, q)) for r in range(2)]
    for p in procs:
        p.start()
    got = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
    mib = 4 * n / MB
    for rank, rs_rise, ag_rise, reduced, gathered in got:
        assert (reduced, gathered) == (2.0, 2.0), rank
        assert 0.8 * mib <= rs_rise <= 1.3 * mib, (rank, rs_rise)
        assert ag_rise <= 0.2 * mib, (rank, ag_rise)


def test_fsdp_on_cpu_plans_glooss_copy_of_the_largest_reduce_scatter():
    """Under fsdp in CPU processes (gloo) the buffers gain one fp32 copy of the largest reduce-scatter
    input: the root unit's trainable gradients or a block's when the blocks train (full), the root's
    alone under LoRA; nothing under other strategies or on GPUs (nccl)."""
    from tunelab.plan import memory

    common = dict(precision="fp32", strategy="fsdp", n=2, unit_params=3e6, root_params=12e6)
    full = {g: memory.device_states(40e6, 40e6, root_trainable=12e6, gloo=g, **common)["buffers"] for g in (False, True)}
    assert full[True] - full[False] == pytest.approx(4 * 12e6)
    wide = {g: memory.device_states(40e6, 40e6, root_trainable=1e6, gloo=g, **common)["buffers"] for g in (False, True)}
    assert wide[True] - wide[False] == pytest.approx(4 * 3e6)  # a block's gradients are the larger input
    lora = {g: memory.device_states(40e6, 2e6, root_trainable=1e3, gloo=g, **common)["buffers"] for g in (False, True)}
    assert lora[True] - lora[False] == pytest.approx(4 * 1e3)
    z2 = dict(common, strategy="zero2")
    assert memory.device_states(40e6, 40e6, gloo=True, **z2)["buffers"] == memory.device_states(40e6, 40e6, **z2)["buffers"]
