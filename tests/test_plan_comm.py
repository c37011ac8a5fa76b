"""Communication per step (plan.comm) and ZeRO-3's own buffers (plan.memory.zero3_buffers) against
hand formulas: ring collectives' bytes (nccl-tests' bus-bandwidth convention), the ZeRO paper's
volumes, DeepSpeed's documented defaults; both planners put the term in their JSON and time."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.plan import comm, memory
from tunelab.plan.hardware import lookup
from tunelab.plan.timecost import time_and_cost

pytestmark = pytest.mark.unit


def test_ring_volumes_reproduce_the_zero_paper():
    """Rajbhandari et al. 2020, section 7: with psi elements of equal size, DDP and ZeRO-1/2 move 2 psi
    per device and step (all-reduce = reduce-scatter + all-gather), ZeRO-3 3 psi (a forward and a
    backward all-gather plus the reduce-scatter), each times (N-1)/N."""
    psi, n = 7.5e9, 64
    ring = (n - 1) / n
    common = dict(n=n, accum=1, weights=psi, trainable_weights=psi, gradients=psi)
    assert comm.step_bytes("ddp", **common)["total"] == pytest.approx(2 * ring * psi)
    assert comm.step_bytes("zero1", **common)["total"] == pytest.approx(2 * ring * psi)
    assert comm.step_bytes("zero2", **common)["total"] == pytest.approx(2 * ring * psi)
    assert comm.step_bytes("zero3", **common)["total"] == pytest.approx(3 * ring * psi)
    assert comm.step_bytes("zero3", **common, regathered=0)["total"] == pytest.approx(2 * ring * psi)
    assert comm.step_bytes("zero3", n=1, accum=1, weights=psi, trainable_weights=psi, gradients=psi)["total"] == 0
    # accumulation: zero2 / zero3 / fsdp reduce every micro-batch, ddp / zero1 once per step
    acc = dict(common, accum=4)
    assert comm.step_bytes("ddp", **acc)["total"] == comm.step_bytes("ddp", **common)["total"]
    assert comm.step_bytes("zero1", **acc)["total"] == comm.step_bytes("zero1", **common)["total"]
    assert comm.step_bytes("zero2", **acc)["total"] == pytest.approx(ring * (4 * psi + psi))
    assert comm.step_bytes("fsdp", **acc)["total"] == pytest.approx(4 * 3 * ring * psi)


def test_strategy_bytes_in_the_dtypes_each_strategy_communicates():
    """7B, bf16, 8 devices, accumulation 2, by hand: DDP all-reduces fp32 gradients (autocast over fp32
    parameters); DeepSpeed bf16 weights and gradients; FSDP2 gathers bf16 and reduces fp32, backward
    re-gathering all but the root; ZeRO-3 keeps reuse_distance / 2 + prefetch = 5.5e8 parameters
    gathered across the turn and gathers the rest again."""
    p, n, a = 7e9, 8, 2
    ring = 7 / 8
    b = lambda s, **k: comm.strategy_step_bytes(s, total=p, trainable=p, precision="bf16", n=n, accum=a, **k)["total"]
    assert b("ddp") == pytest.approx(2 * ring * 4 * p)
    assert b("zero1") == pytest.approx(ring * (2 * p + 2 * p))
    assert b("zero2") == pytest.approx(ring * (a * 2 * p + 2 * p))
    assert b("zero3") == pytest.approx(ring * a * (2 * p + 2 * (p - 5.5e8) + 2 * p))
    root = 5e8
    assert b("fsdp", root_params=root) == pytest.approx(ring * a * (2 * p + 2 * (p - root) + 4 * p))
    assert b("fsdp", root_params=root, reshard_after_forward=False) == pytest.approx(ring * a * (2 * p + 4 * p))
    # LoRA under zero3: the frozen base is gathered, only the adapters' gradients reduced
    lora = comm.strategy_step_bytes("zero3", total=p, trainable=4e7, precision="bf16", n=n, accum=1)
    assert lora["reduce_scatter_gradients"] == pytest.approx(ring * 2 * 4e7)


def test_links_and_seconds():
    assert comm.link_for("H100").gb_per_s == 450 and comm.link_for("A100-80GB").name == "nvlink3"
    assert comm.link_for("L4").name == "pcie4" and comm.link_for("H100-PCIe").name == "pcie5"
    assert comm.link_for("H100", nodes=2).name == "infiniband"  # the ring crosses the slowest link
    assert comm.link_for(None).name == "gloo-loopback"
    assert comm.link_for("H100", interconnect="ethernet").gb_per_s == 12.5
    assert comm.link_for("H100", gb_per_s=7.0).gb_per_s == 7.0
    with pytest.raises(Exception, match="--interconnect|unknown interconnect"):
        comm.link_for("H100", interconnect="carrier-pigeon")
    per_step = comm.step_bytes("ddp", n=8, accum=1, weights=0, trainable_weights=0, gradients=28e9)
    s = comm.step_seconds(per_step, comm.LINKS["nvlink4"], overlap=0.25)
    assert s["seconds_per_step"] == pytest.approx(2 * 7 / 8 * 28e9 / 450e9)
    assert s["exposed_seconds_per_step"] == pytest.approx(0.75 * s["seconds_per_step"])
    t = time_and_cost(1e18, devices=8, peak_flops=1e15, mfu=0.5, comm_seconds=10.0, price_per_hour=2.0)
    assert t["compute_seconds"] == pytest.approx(250.0) and t["seconds"] == pytest.approx(260.0)
    assert t["cost"] == pytest.approx(8 * 260 / 3600 * 2.0)


def test_zero3_buffers_from_deepspeeds_defaults():
    """DeepSpeed 0.19's own defaults (its config model), tunelab's persistence threshold (0), and the
    buffers by hand. 7B bf16 on 8 GPUs: 5.5e8 parameters gathered (1.1e9 bytes), the 5e8-element bf16
    bucket allocated whole (1e9), a full bucket's reduce-scatter input and output (1e9 x 9/8), the fp32
    gradient of a 1e9-element sub-group partition at most (7e9/8 = 8.75e8 here: 3.5e9). MiniLM in fp32
    on 2 CPU processes: all 22.7M gathered, the bucket written as far as its gradients (22.7M x 4), its
    reduce-scatter 1.5 x that, half of them in the fp32 gradient partition."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from tunelab.distributed.zero import deepspeed_config

    ds = DeepSpeedZeroConfig()
    assert memory.ZERO3_DEFAULTS == {
        "reduce_bucket_size": ds.reduce_bucket_size, "stage3_prefetch_bucket_size": ds.prefetch_bucket_size,
        "stage3_max_live_parameters": ds.max_live_parameters, "stage3_max_reuse_distance": ds.max_reuse_distance,
        "stage3_param_persistence_threshold": 0, "sub_group_size": ds.sub_group_size}
    zero = deepspeed_config(3, batch_size=1, max_grad_norm=1.0, precision="bf16", cpu_offload=False)["zero_optimization"]
    assert zero["stage3_param_persistence_threshold"] == 0
    assert not set(zero) & (set(memory.ZERO3_DEFAULTS) - {"stage3_param_persistence_threshold"})  # the rest default

    big = memory.zero3_buffers(7e9, 7e9, n=8, act_bytes=2)
    assert big == pytest.approx({"gathered": 1.1e9, "bucket": 1e9, "reduce_scatter": 1e9 * 9 / 8,
                                 "fp32_gradients": 3.5e9, "total": 6.725e9})
    assert memory.zero3_buffers(7e10, 7e10, n=8, act_bytes=2)["fp32_gradients"] == pytest.approx(4e9)  # sub_group_size
    p = 22_713_216
    small = memory.zero3_buffers(p, p, n=2, act_bytes=4, whole_bucket=False)
    assert small == pytest.approx({"gathered": 4 * p, "bucket": 4 * p, "reduce_scatter": 6 * p, "fp32_gradients": 2 * p,
                                   "total": 16 * p})
    assert memory.zero3_buffers(p, p, n=2, act_bytes=4)["bucket"] == pytest.approx(2e9)  # whole on a GPU
    states = memory.device_states(p, p, precision="fp32", strategy="zero3", n=2, whole_bucket=False)
    assert states["buffers"] == pytest.approx(16 * p)


@pytest.mark.e2e
def test_hardware_plan_json_has_the_communication_term(tmp_path):
    from transformers import LlamaConfig

    path = tmp_path / "config.json"
    LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=8000).to_json_file(path)
    args = ["plan", "--model", str(path), "--gpu", "H100", "--gpus", "4", "--strategy", "ddp", "--seq-len", "256",
            "--batch-size", "2", "--grad-accum", "2", "--tokens", "1e6", "--json"]
    res = CliRunner().invoke(app, args + ["--link-bandwidth", "10", "--comm-overlap", "0.5"])
    assert res.exit_code == 0, res.output
    p = json.loads(res.stdout)
    c, t = p["communication"], p["time"]
    assert c["link"] == "nvlink4" and c["link_gb_per_s"] == 10 and c["overlap"] == 0.5
    assert c["bytes_per_step"] == pytest.approx(2 * 3 / 4 * 4 * p["trainable_params"])
    steps = 1e6 / (256 * 2 * 2 * 4)
    assert t["communication_seconds"] == pytest.approx(steps * 0.5 * c["bytes_per_step"] / 10e9)
    assert t["seconds"] == pytest.approx(t["compute_seconds"] + t["communication_seconds"])
    bad = CliRunner().invoke(app, args + ["--interconnect", "carrier-pigeon"])
    assert bad.exit_code == 2 and "--interconnect" in bad.output and "Traceback" not in bad.output


def test_offload_traffic_by_hand():
    """7B, bf16, 8 devices, accumulation 2 (plan.comm's offload table): ZeRO-Offload moves the 16-bit
    gradient partition down (zero2: every micro-batch) and the updated 16-bit weights up; ZeRO-3 with
    offload_param fetches every gather's partition (all but the 5.5e8 parameters it keeps gathered
    across the turn, again in backward) and sends the gradients down; FSDP2's CPUOffloadPolicy copies
    the fp32 shards up for every unshard (backward re-gathers all but the root) and the fp32 reduced
    gradients down. ddp offloads nothing; on the CPU nothing crosses a host link."""
    p, n, a, root = 7e9, 8, 2, 5e8
    b = lambda s: comm.offload_step_bytes(s, total=p, trainable=p, precision="bf16", n=n, accum=a,
                                          root_params=root)
    assert b("zero1")["device_to_host"] == pytest.approx(2 * p / n) and b("zero1")["host_to_device"] == pytest.approx(2 * p / n)
    assert b("zero2")["device_to_host"] == pytest.approx(a * 2 * p / n)
    assert b("zero3")["host_to_device"] == pytest.approx(a * (2 * p + 2 * (p - 5.5e8)) / n)
    assert b("zero3")["device_to_host"] == pytest.approx(a * 2 * p / n)
    assert b("fsdp")["total"] == pytest.approx(a * (4 * p + 4 * (p - root) + 4 * p) / n)
    assert b("ddp")["total"] == 0
    assert comm.host_link_for("H100").name == "pcie5" and comm.host_link_for("A100-80GB").name == "pcie4"
    assert comm.host_link_for("custom").name == "pcie4" and comm.host_link_for(None) is None
    s = comm.offload_seconds(b("zero2"), comm.LINKS["pcie5"])
    assert s["seconds_per_step"] == pytest.approx(b("zero2")["total"] / 64e9)
    assert comm.offload_seconds(b("zero2"), None)["seconds_per_step"] == 0


def test_step_time_adds_compute_collectives_and_offload_and_the_run_is_its_steps(tmp_path):
    """plan_one's `step` (what recommendations are ranked by) = its tokens' FLOPs at devices x peak x
    MFU + exposed communication + offload traffic; with --tokens the run's time is that step times the
    steps, and ZeRO-3 + offload on one device keeps no model state there but all of DeepSpeed's buffers
    except the fp32 gradient partition (on the host with the optimizer)."""
    from transformers import LlamaConfig

    from tunelab.plan.model_plan import Model, Spec, plan_one

    path = tmp_path / "config.json"
    LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=8, vocab_size=32000).to_json_file(path)
    spec = Spec(model=str(path), gpu=lookup("H100"), gpus=4, strategy="zero2", offload=True, seq_len=1024,
                batch_size=2, grad_accum=3, tokens=1e8)
    p = plan_one(Model(spec), spec)
    st = p["step"]
    assert st["tokens"] == 1024 * 2 * 3 * 4
    assert st["compute_seconds"] == pytest.approx(p["flops"]["per_token"] * st["tokens"] / (4 * 989e12 * 0.4))
    assert st["communication_seconds"] == pytest.approx(p["communication"]["exposed_seconds_per_step"])
    assert st["offload_seconds"] == pytest.approx(p["offload_traffic"]["seconds_per_step"])
    assert st["communication_seconds"] > 0 and st["offload_seconds"] > 0
    assert st["seconds"] == pytest.approx(st["compute_seconds"] + st["communication_seconds"] + st["offload_seconds"])
    assert p["time"]["seconds"] == pytest.approx(st["seconds"] * 1e8 / st["tokens"])
    assert p["time"]["offload_seconds"] == pytest.approx(st["offload_seconds"] * 1e8 / st["tokens"])
    one = Spec(model=str(path), gpu=lookup("H100"), strategy="zero3", offload=True, seq_len=1024)
    q = plan_one(Model(one), one)
    total = q["total_params"]
    bufs = memory.zero3_buffers(total, total, n=1, offload=True)
    assert bufs["fp32_gradients"] == 0 and memory.zero3_buffers(total, total, n=1)["fp32_gradients"] == 4 * total
    assert q["per_device"]["model_states_bytes"] == 0
    assert q["per_device"]["overhead_bytes"] == pytest.approx(memory.CUDA_CONTEXT_BYTES + bufs["total"], abs=4)
