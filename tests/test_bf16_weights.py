"""train.weights_dtype bf16 (train/bf16_adamw.py, train/precision.py): bf16 weights and gradients,
fp32 moments, stochastic rounding. Against independent references: the two bf16 neighbours of a
value and its expected rounding written out here; torch.optim.AdamW on fp32 parameters; the fp32
AdamW trajectory that round-to-nearest bf16 loses and stochastic rounding follows on average; the
exact path's loss curve on a tiny chat model; an exact resume; the refusals."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 values either side of fp32 `x` (toward zero, away from zero), by truncating its bits."""
    bits = x.view(torch.int32)
    down = (bits & -65536).view(torch.float32)
    up = ((bits & -65536) + 65536).view(torch.float32)
    exact = (bits & 0xFFFF) == 0
    return down, torch.where(exact, down, up)


@pytest.mark.unit
def test_stochastic_rounding_lands_on_a_neighbour_and_is_unbiased():
    from tunelab.train.bf16_adamw import stochastic_round_bf16

    g = torch.Generator().manual_seed(0)
    x = torch.randn(20_000, generator=g) * 10
    down, up = _neighbours(x)
    r = stochastic_round_bf16(x, torch.Generator().manual_seed(1))
    assert r.dtype == torch.bfloat16
    rf = r.float()
    assert bool(((rf == down) | (rf == up)).all())
    assert bool((rf != x.to(torch.bfloat16).float()).any())  # not round-to-nearest
    # one value rounded many times: the mean is the value (p(up) = its distance from below / ulp)
    for v in (1.0 + 0.3 * 2**-7, -3.0 - 0.9 * 2**-6, 1e-30 * 1.2345):
        xs = torch.full((40_000,), v, dtype=torch.float32)
        d, u = _neighbours(xs[:1])
        p_up = (v - float(d)) / (float(u) - float(d))
        got = stochastic_round_bf16(xs, torch.Generator().manual_seed(2)).float()
        share_up = float((got == u).float().mean())
        assert share_up == pytest.approx(p_up, abs=4 * (p_up * (1 - p_up) / 40_000) ** 0.5 + 1e-9), v
    # an odd count in a 2-d shape (the noise is drawn two values per 64-bit draw): both lanes unbiased
    xs = torch.full((201, 199), 1.0 + 0.25 * 2**-7, dtype=torch.float32)
    got = stochastic_round_bf16(xs, torch.Generator().manual_seed(3)).float()
    assert got.shape == xs.shape
    for lane in (got.view(-1)[0::2], got.view(-1)[1::2]):
        assert float((lane > 1).float().mean()) == pytest.approx(0.25, abs=4 * (0.25 * 0.75 / lane.numel()) ** 0.5)
    exact = torch.tensor([1.0, -2.5, 0.0, float("inf"), float("-inf")])
    assert torch.equal(stochastic_round_bf16(exact).float(), exact)
    mixed = torch.tensor([1.0 + 2**-9, float("nan"), float("inf"), 3e38, 3e38])  # the sum overflows, one NaN
    r = stochastic_round_bf16(mixed).float()
    assert bool(r[1].isnan()) and r[2] == float("inf") and not bool(r[[0, 3, 4]].isnan().any())
    nans = torch.tensor([float("nan")] * 64).view(torch.int32) | 0x7FFFFF  # the largest NaN payload
    assert bool(stochastic_round_bf16(nans.view(torch.float32)).isnan().all())
    with pytest.raises(TypeError):
        stochastic_round_bf16(x.double())


@pytest.mark.unit
def test_on_fp32_parameters_it_is_torch_adamw():
    from tunelab.train.bf16_adamw import AdamWBf16

    torch.manual_seed(0)
    shapes = [(37, 11), (5,), (300,)]
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    groups = lambda ps: [{"params": ps[:2], "lr": 3e-3, "weight_decay": 0.1}, {"params": ps[2:], "lr": 1e-2,
                                                                                "weight_decay": 0.0}]
    a = AdamWBf16(groups(ours), betas=(0.9, 0.95), eps=1e-6, chunk=64)  # chunks that split every matrix
    b = torch.optim.AdamW(groups(ref), betas=(0.9, 0.95), eps=1e-6, foreach=False)
    for _ in range(6):
        for p, q in zip(ours, ref):
            g = torch.randn(p.shape)
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
    for p, q in zip(ours, ref):
        assert torch.allclose(p, q, rtol=1e-6, atol=1e-7)
        assert not torch.equal(p, torch.zeros_like(p))
    for p, q in zip(ours, ref):
        assert torch.allclose(a.state[p]["exp_avg_sq"], b.state[q]["exp_avg_sq"], rtol=1e-6, atol=0)


@pytest.mark.unit
def test_small_updates_that_round_to_nearest_loses_accumulate():
    """Updates of ~0.13 of a bf16 ulp: torch's AdamW on bf16 weights never moves them; ours follows the
    fp32 trajectory on average."""
    from tunelab.train.bf16_adamw import AdamWBf16

    n, steps, lr = 4096, 200, 1e-3  # at 1.0 a bf16 ulp is 2**-7 = 7.8e-3
    start = torch.ones(n)
    fp32 = torch.nn.Parameter(start.clone())
    rne = torch.nn.Parameter(start.clone().to(torch.bfloat16))
    sr = torch.nn.Parameter(start.clone().to(torch.bfloat16))
    opts = [torch.optim.AdamW([fp32], lr=lr, weight_decay=0.0), torch.optim.AdamW([rne], lr=lr, weight_decay=0.0),
            AdamWBf16([sr], lr=lr, weight_decay=0.0, seed=3)]
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        grad = torch.rand(n, generator=g) + 0.5  # always positive: the weights go down ~lr a step
        for p, o in zip((fp32, rne, sr), opts):
            p.grad = grad.to(p.dtype)
            o.step()
    fp32 = fp32.detach()
    moved = float(1 - fp32.mean())
    assert moved > 0.15  # the fp32 reference moved ~25 ulps
    assert torch.equal(rne.detach().float(), start)  # the premise: round-to-nearest lost every update
    assert float(1 - sr.detach().float().mean()) == pytest.approx(moved, rel=0.02)
    # each rounding adds an independent error of variance p (1 - p) ulp^2 <= ulp^2 / 4: a random walk
    spread = float((sr.detach().float() - fp32).std())
    print("spread of bf16 - fp32 weights, in ulps at 1.0:", spread / 2**-7)
    assert 0 < spread <= (steps / 4) ** 0.5 * 2**-7


@pytest.mark.unit
def test_the_same_seed_and_state_give_the_same_weights():
    from tunelab.train.bf16_adamw import AdamWBf16

    torch.manual_seed(0)
    w0 = torch.randn(1000).to(torch.bfloat16)
    grads = [torch.randn(1000).to(torch.bfloat16) for _ in range(6)]

    def run(cut: int | None):
        p = torch.nn.Parameter(w0.clone())
        opt = AdamWBf16([p], lr=1e-3, seed=7)
        for i, g in enumerate(grads):
            if i == cut:  # a resume: fresh parameter and optimizer from what a checkpoint holds
                saved, w = opt.state_dict(), p.detach().clone()
                p = torch.nn.Parameter(w)
                opt = AdamWBf16([p], lr=1e-3, seed=7)
                opt.load_state_dict(saved)
                assert opt.state[p]["exp_avg"].dtype == torch.float32
            p.grad = g.clone()
            opt.step()
        return p.detach()

    straight = run(None)
    assert torch.equal(run(3), straight)
    other = torch.nn.Parameter(w0.clone())
    o = AdamWBf16([other], lr=1e-3, seed=8)
    for g in grads:
        other.grad = g.clone()
        o.step()
    assert not torch.equal(other.detach(), straight)  # the seed does reach the rounding


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from tiny_models import tiny_llama_folder

    return tiny_llama_folder(tmp_path_factory.mktemp("tiny_llama_bf16w"))


def _run(tmp_path, model, name, weights: str, steps: int, resume=None, should_stop=None, method="full",
         optim="adamw"):
    from tiny_models import conversations

    from tunelab.config import Config
    from tunelab.monitor.metrics_log import read_metrics
    from tunelab.run import run_training

    data = tmp_path / "train.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps(c) + "\n" for c in conversations(24)), encoding="utf-8")
    raw = {"task": "chat", "model": {"name": str(model), "max_length": 64}, "method": method,
           "data": {"train": str(data), "eval_split": 0, "packing": True, "cache": False},
           "optim": {"lr": 3e-3, "name": optim}, "schedule": {"name": "constant", "warmup_steps": 0},
           "train": {"max_steps": steps, "batch_size": 2, "log_every": 1, "seed": 1, "eval_before": False,
                     "precision": "bf16", "weights_dtype": weights},
           "checkpoint": {"final": "last", "keep_last": 1}, "early_stopping": {"enabled": False},
           "eval": {"generate": {"n": 0}}}
    run_training(Config.model_validate(raw), tmp_path / name, show_progress=False, resume=resume, should_stop=should_stop)
    return [r["loss"] for r in read_metrics(tmp_path / name / "metrics.jsonl") if "loss" in r]


@pytest.mark.e2e
def test_loss_curve_follows_fp32_weights_and_resume_is_exact(tmp_path, tiny_llama):
    from conftest import stop_after
    from safetensors.torch import load_file

    from tunelab.errors import InputError

    exact = _run(tmp_path, tiny_llama, "exact", "fp32", 30)
    low = _run(tmp_path, tiny_llama, "low", "bf16", 30)
    saved = load_file(str(tmp_path / "low" / "final" / "model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    assert len(low) == len(exact) == 30 and low != exact
    assert exact[-1] < 0.7 * exact[0]  # the run learns, so following it means something
    print("largest relative loss difference", max(abs(a - b) / b for a, b in zip(low, exact)))
    for i, (a, b) in enumerate(zip(low, exact)):
        assert a == pytest.approx(b, rel=0.02), i  # measured: at most 0.18% apart over the 30 steps
    # exact resume, and a resume that would switch the weights' dtype is refused
    straight = _run(tmp_path, tiny_llama, "straight", "bf16", 6)
    _run(tmp_path, tiny_llama, "cut", "bf16", 6, should_stop=stop_after(3))
    with pytest.raises(InputError) as e:
        _run(tmp_path, tiny_llama, "cut", "fp32", 6, resume="auto")
    assert e.value.field == "train.weights_dtype"
    assert _run(tmp_path, tiny_llama, "cut", "bf16", 6, resume="auto") == straight
    a = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.e2e
def test_lora_keeps_the_base_in_bf16_and_learns(tmp_path, tiny_llama):
    losses = _run(tmp_path, tiny_llama, "lora", "bf16", 12, method="lora")
    assert losses[-1] < losses[0]
    from tunelab.config import Config
    from tunelab.run import setup

    cfg = Config.model_validate({"task": "chat", "model": {"name": str(tiny_llama), "max_length": 64},
                                 "method": "lora", "data": {"train": str(tmp_path / "train.jsonl"), "eval_split": 0,
                                                            "cache": False},
                                 "train": {"weights_dtype": "bf16", "max_steps": 1},
                                 "early_stopping": {"enabled": False}})
    r = setup(cfg)
    dtypes = {p.dtype for p in r.model.parameters()}
    assert dtypes == {torch.bfloat16} and r.precision == "bf16"
    buffers = {b.dtype for b in r.model.buffers() if b.is_floating_point()}
    assert buffers == {torch.float32}  # rotary inv_freq stays fp32
    assert type(r.optimizer).__name__ == "AdamWBf16"


@pytest.mark.unit
@pytest.mark.parametrize("extra,field", [
    ("train:\n  weights_dtype: bf16\n  precision: fp32\n", "train.precision"),
    ("train:\n  weights_dtype: bf16\n  precision: fp16\n", "train.precision"),
    ("method: qlora\ntrain:\n  weights_dtype: bf16\n", "train.weights_dtype"),
    ("train:\n  weights_dtype: bf16\ndistributed:\n  strategy: fsdp\n", "train.weights_dtype"),
    ("train:\n  weights_dtype: bf16\nregularization:\n  l2sp: 0.1\n", "regularization.l2sp"),
    ("train:\n  weights_dtype: bf16\nregularization:\n  mixout: 0.1\n", "regularization.mixout"),
])
def test_refusals_name_the_field(tmp_path, extra, field):
    from tunelab.config import load_config
    from tunelab.errors import InputError

    p = tmp_path / "c.yaml"
    p.write_text("task: chat\ndata:\n  train: t.jsonl\n" + extra)
    with pytest.raises(InputError) as e:
        load_config(p)
    assert e.value.field == field
    p.write_text("task: chat\ndata:\n  train: t.jsonl\ntrain:\n  weights_dtype: bf16\n")
    assert load_config(p).train.weights_dtype == "bf16"


@pytest.mark.unit
def test_the_planner_counts_two_bytes_for_weights_and_gradients(tmp_path, tiny_llama):
    from tunelab.config import Config
    from tunelab.plan.planner import param_bytes
    from tunelab.plan.probe import meta_model

    def bytes_of(weights: str):
        cfg = Config.model_validate({"task": "chat", "model": {"name": str(tiny_llama)},
                                     "data": {"train": "t.jsonl"}, "train": {"weights_dtype": weights}})
        model = meta_model(cfg, None)
        return param_bytes(model, cfg), {p.dtype for p in model.parameters()}

    (b32, d32), (b16, d16) = bytes_of("fp32"), bytes_of("bf16")
    n = b32["total_params"]
    assert d32 == {torch.float32} and d16 == {torch.bfloat16}
    assert b32["weights"] == 4 * n and b16["weights"] == 2 * n
    assert b32["gradients"] == 4 * n and b16["gradients"] == 2 * n
    assert b16["optimizer"] == b32["optimizer"] == 8 * n  # the moments stay fp32


@pytest.mark.unit
def test_8bit_moments_on_bf16_weights_take_the_fp32_kernels_step_then_round():
    """optim.name adamw_8bit with bf16 weights: each chunk runs bitsandbytes' kernel on fp32 copies and the
    new weight lands on one of the two bf16 neighbours of the fp32 kernel's result; the moments equal those
    of the same optimizer on fp32 weights bit for bit (8-bit codes, absmax, and the fp32 moments of a small
    tensor)."""
    from tunelab.train.optim import AdamW8bit

    torch.manual_seed(0)
    big16 = torch.nn.Parameter(torch.randn(40, 125).to(torch.bfloat16))  # 5000 values: 8-bit moments
    small16 = torch.nn.Parameter(torch.randn(100).to(torch.bfloat16))  # under min_8bit_size: fp32 moments
    big32, small32 = (torch.nn.Parameter(t.detach().float()) for t in (big16, small16))
    kw = dict(lr=1e-2, weight_decay=0.1, min_8bit_size=256, chunk=512)  # chunks split the big tensor
    o16 = AdamW8bit([big16, small16], bf16_seed=5, **kw)
    o32 = AdamW8bit([big32, small32], **kw)
    for _ in range(3):
        for p16, p32 in ((big16, big32), (small16, small32)):
            g = torch.randn(p16.shape).to(torch.bfloat16)
            p16.grad, p32.grad = g.clone(), g.float()
            p32.data = p16.detach().float()  # the fp32 run starts each step from the bf16 weights
        o16.step()
        o32.step()
        for p16, p32 in ((big16, big32), (small16, small32)):
            assert p16.dtype == torch.bfloat16
            down, up = _neighbours(p32.detach())
            w = p16.detach().float()
            assert bool(((w == down) | (w == up)).all())
            for key, v in o32.state[p32].items():
                if torch.is_tensor(v) and key not in ("qmap1", "qmap2"):
                    assert torch.equal(o16.state[p16][key], v), key
    assert o16.state[big16]["state1"].dtype == torch.uint8 and o16.state[small16]["state1"].dtype == torch.float32
    rounded_up = float((big16.detach().float() == _neighbours(big32.detach())[1]).float().mean())
    assert 0.05 < rounded_up < 0.95  # stochastic: neither always down nor always up


@pytest.mark.e2e
def test_8bit_moments_with_bf16_weights_follow_the_exact_path_and_resume_exactly(tmp_path, tiny_llama, monkeypatch):
    import tunelab.train.optim as optim
    from conftest import stop_after

    monkeypatch.setattr(optim, "MIN_8BIT_SIZE", 256)  # every matrix of the tiny model gets 8-bit moments
    exact = _run(tmp_path, tiny_llama, "exact", "fp32", 30)
    low = _run(tmp_path, tiny_llama, "low", "bf16", 30, optim="adamw_8bit")
    state = torch.load(tmp_path / "low" / "checkpoints" / "step-000030" / "optimizer.pt", weights_only=True)["state"]
    kinds = [s["__bnb_optimizer_quant_state__"]["state1"].dtype for s in state.values()]
    assert kinds.count(torch.uint8) >= 9
    print("largest relative loss difference", max(abs(a - b) / b for a, b in zip(low, exact)))
    for i, (a, b) in enumerate(zip(low, exact)):
        assert a == pytest.approx(b, rel=0.02), i
    straight = _run(tmp_path, tiny_llama, "straight", "bf16", 6, optim="adamw_8bit")
    _run(tmp_path, tiny_llama, "cut", "bf16", 6, should_stop=stop_after(3), optim="adamw_8bit")
    assert _run(tmp_path, tiny_llama, "cut", "bf16", 6, resume="auto", optim="adamw_8bit") == straight


@pytest.mark.e2e
def test_plan_of_a_bf16_weights_config_suggests_only_what_it_can_take(tmp_path, tiny_llama):
    """`tunelab plan CONFIG`: bf16 weights halve the planned weights and gradients; its memory levers are
    valid configs (QLoRA comes with train.weights_dtype=fp32, which its 4-bit base needs) - before, the
    QLoRA lever was an internal error."""
    import yaml
    from typer.testing import CliRunner

    from tiny_models import conversations
    from tunelab.cli import app

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in conversations(24)), encoding="utf-8")
    plans = {}
    for weights in ("fp32", "bf16"):
        cfg = tmp_path / f"{weights}.yaml"
        cfg.write_text(yaml.safe_dump({"task": "chat", "model": {"name": str(tiny_llama), "max_length": 64},
                                       "data": {"train": str(data)},
                                       "train": {"precision": "bf16", "weights_dtype": weights}}))
        res = CliRunner().invoke(app, ["plan", str(cfg), "--measure-steps", "0", "--json"])
        assert res.exit_code == 0, res.output
        plans[weights] = json.loads(res.stdout)
    s32, s16 = plans["fp32"]["per_process_states"], plans["bf16"]["per_process_states"]  # bytes
    n = plans["bf16"]["params"]["total_params"]
    assert (s32["weights"], s32["gradients"], s16["weights"], s16["gradients"]) == (4 * n, 4 * n, 2 * n, 2 * n)
    assert s16["optimizer"] == s32["optimizer"] == 8 * n
    assert plans["bf16"]["memory_mb"]["activations"] < plans["fp32"]["memory_mb"]["activations"]
    assert plans["bf16"]["weights_dtype"] == "bf16"
    changes = [s["change"] for s in plans["bf16"]["suggestions"]]
    assert "method=qlora, train.weights_dtype=fp32" in changes and "method=qlora" in [
        s["change"] for s in plans["fp32"]["suggestions"]]
