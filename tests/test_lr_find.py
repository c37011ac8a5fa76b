"""The learning-rate range test (issue 20): the picking rule on a synthetic curve, the sweep on a
real (linear) model restores weights, optimizer and RNG bit-identically, the cache, and an
`optim.lr: auto` run that trains, resumes exactly and equals a run given the chosen number."""

from __future__ import annotations

import copy
import json
import math
import random
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from conftest import stop_after
from tunelab.compose import lr_fingerprint, starting_lr
from tunelab.config import Config
from tunelab.run import run_training
from tunelab.train import lr_find
from tunelab.train.optim import build_optimizer, param_groups

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(autouse=True)
def own_lr_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_LR_FIND_CACHE", str(tmp_path / "lr_cache"))


def synthetic_loss(lr: float) -> float:
    """Flat at 1.0 below 1e-4, falling (log-linearly) to 0.2 at 1e-2, then blowing up."""
    x = math.log10(lr)
    if x < -4:
        return 1.0
    if x <= -2:
        return 1.0 - 0.4 * (x + 4)
    return 0.2 * math.exp(5 * (x + 2))


def test_the_rule_picks_inside_the_falling_region_of_a_synthetic_curve():
    rng = random.Random(0)
    lrs = lr_find.lr_sweep(lr_find.RangeTest(start_lr=1e-7, end_lr=1.0, steps=100))
    losses = [synthetic_loss(lr) * (1 + 0.03 * rng.uniform(-1, 1)) for lr in lrs]
    choice = lr_find.pick_lr(lrs, lr_find.smooth_losses(losses, 0.9))
    assert 1e-4 < choice["lr"] < 1e-2  # where the loss falls: after the plateau, before the minimum
    assert choice["lr"] <= choice["lr_min"] / 10 * (1 + 1e-9)
    assert 1e-3 < choice["lr_min"] < 5e-2  # the smoothed minimum sits at the true one (1e-2), lagged a little
    flat = lr_find.pick_lr(lrs, [1.0] * len(lrs))
    assert flat["lr"] is None and "never fell" in flat["rule"]


def test_smoothing_is_the_bias_corrected_average():
    out = lr_find.smooth_losses([1.0, 3.0], 0.5)
    assert out[0] == 1.0  # bias correction: the first value is itself
    assert out[1] == pytest.approx((0.5 * 0.5 * 1.0 + 0.5 * 3.0) / (1 - 0.25))


def _linear_task(n: int = 512, dim: int = 8, seed: int = 0):
    """Noisy linear regression: a model whose range-test curve falls, then diverges."""
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(n, dim, generator=g), torch.randn(dim, 1, generator=g)
    y = x @ w + 0.1 * torch.randn(n, 1, generator=g)

    def loss_fn(model, batch):
        return ((model(batch["x"]) - batch["y"]) ** 2).sum(), len(batch["y"])

    from tunelab.train.protocols import TrainSet

    train = TrainSet(lengths=[1] * n, collate=lambda idx: {"x": x[idx], "y": y[idx],
                                                            "attention_mask": torch.ones(len(idx), 1)},
                     count=len)
    return SimpleNamespace(train=train, loss_fn=loss_fn, train_stats=None)


def test_the_sweep_restores_weights_optimizer_and_rng_bit_identically():
    torch.manual_seed(1)
    model, task = torch.nn.Linear(8, 1), _linear_task()
    optimizer = build_optimizer(param_groups(model, lr=1e-3, weight_decay=0.01))
    # one real step first, so the optimizer holds state (moments, step count) that the sweep would change
    loss, _ = task.loss_fn(model, task.train.collate(list(range(32))))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    opt_state = copy.deepcopy(optimizer.state_dict())
    rng, py_rng = torch.get_rng_state(), random.getstate()

    found = lr_find.range_test(model, optimizer, task, nullcontext, base_lr=1e-3, batch_size=32, grad_accum=1,
                               max_grad_norm=None, seed=0, test=lr_find.RangeTest(end_lr=100.0, steps=100))
    assert 1e-2 < found["lr"] < 2 and found["lr"] < found["lr_min"]  # Adam learns this at 1e-2..1, diverges above
    assert len(found["curve"]) < 100  # stopped at the divergence
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    after = optimizer.state_dict()
    assert after["param_groups"] == opt_state["param_groups"]  # lr and every hyperparameter back
    for i, st in opt_state["state"].items():
        for k, v in st.items():
            assert torch.equal(after["state"][i][k], v), (i, k)
    assert torch.equal(torch.get_rng_state(), rng) and random.getstate() == py_rng
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU: the snapshot must not hold a second device copy"))])
def test_the_snapshot_is_host_copies_that_do_not_alias_the_model(device):
    torch.manual_seed(1)
    model = torch.nn.Linear(8, 2).to(device)
    optimizer = build_optimizer(param_groups(model, lr=1e-3, weight_decay=0.01))
    model(torch.randn(4, 8, device=device)).sum().backward()
    optimizer.step()
    snap = lr_find._snapshot(model, optimizer)
    tensors = list(snap["params"].values()) + [v for st in snap["optimizer"]["state"].values()
                                               for v in st.values() if isinstance(v, torch.Tensor)]
    assert len(snap["params"]) == 2 and len(tensors) > 2
    assert all(t.device.type == "cpu" for t in tensors)
    live = {p.untyped_storage().data_ptr() for p in model.parameters()}
    live |= {v.untyped_storage().data_ptr() for st in optimizer.state.values() for v in st.values()
             if isinstance(v, torch.Tensor)}
    assert not live & {t.untyped_storage().data_ptr() for t in tensors}  # copies: later steps leave them as they are
    before = {k: v.clone() for k, v in snap["params"].items()}
    optimizer.step()  # the same gradients again: the weights move
    lr_find._restore(model, optimizer, snap)
    assert all(torch.equal(p.detach().cpu(), before[n]) for n, p in model.named_parameters())
    assert all(v.device.type == device for st in optimizer.state.values() for k, v in st.items() if k != "step")


def _auto_cfg(toy, **train):
    raw = copy.deepcopy(toy["config"])
    raw["optim"] = {"lr": "auto", "head_lr_multiplier": 1.0}
    raw["train"].update({"eval_every": 3, **train})
    raw["checkpoint"] = {"final": "last", "keep_last": 1}
    return raw


def _weights(run):
    return load_file(str(run / "final" / "model.safetensors"))


def test_auto_run_stores_the_sweep_reuses_it_resumes_exactly_and_equals_the_number(toy_classification, tmp_path,
                                                                                    monkeypatch):
    import yaml

    raw = _auto_cfg(toy_classification)
    s = run_training(Config.model_validate(raw), tmp_path / "a", show_progress=False)
    assert s["status"] == "completed" and s["lr_find"]["source"] == "sweep"
    found = json.loads((tmp_path / "a" / "lr_find.json").read_text())
    assert found["curve"] and found["fingerprint"] == s["lr_find"]["fingerprint"]
    lr = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())["optim"]["lr"]
    assert isinstance(lr, float) and lr == (found["lr"] or found["placeholder_lr"])
    assert s["defaults"]["optim.lr"]["value"] == lr
    assert s["eval_trust"]["source"] == "data.eval" and s["eval_trust"]["rows"] == 16
    assert "range test" in (tmp_path / "a" / "report.html").read_text()

    # another run dir: the user cache answers; stopped at step 5, then resumed with only the run dir's file
    cut = run_training(Config.model_validate(raw), tmp_path / "cut", show_progress=False, should_stop=stop_after(5))
    assert cut["status"] == "interrupted" and (tmp_path / "cut" / "lr_find.json").is_file()
    monkeypatch.setenv("TUNELAB_LR_FIND_CACHE", str(tmp_path / "empty_cache"))
    calls = []
    real = lr_find.range_test
    monkeypatch.setattr(lr_find, "range_test", lambda *a, **k: calls.append(1) or real(*a, **k))
    resumed = run_training(Config.model_validate(raw), tmp_path / "cut", resume="auto", show_progress=False)
    assert resumed["status"] == "completed" and resumed["lr_find"]["source"] == "cache" and not calls
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)  # exact resume

    fixed = copy.deepcopy(raw)
    fixed["optim"]["lr"] = lr
    plain = run_training(Config.model_validate(fixed), tmp_path / "c", show_progress=False)
    c = _weights(tmp_path / "c")
    assert all(torch.equal(a[k], c[k]) for k in a)  # the sweep left no trace on the run
    assert plain["steps"] == s["steps"]


def test_the_fingerprint_follows_model_data_method_and_step_shape(toy_classification):
    raw = _auto_cfg(toy_classification)
    base = lr_fingerprint(Config.model_validate(raw), "fp32")
    assert lr_fingerprint(Config.model_validate(raw), "fp32") == base
    for key, value in (("train", {"batch_size": 4}), ("method", "lora"), ("data", {"max_rows": 10})):
        other = copy.deepcopy(raw)
        other[key] = {**other[key], **value} if isinstance(value, dict) else value
        assert lr_fingerprint(Config.model_validate(other), "fp32") != base, key
    assert lr_fingerprint(Config.model_validate(raw), "bf16") != base


def test_the_fingerprint_of_a_list_of_sources_follows_each_source(toy_classification):
    """data.train as weighted sources (chat, causal_lm) is stamped source by source; it raised TypeError."""
    from tunelab.config import DataSource

    cfg = Config.model_validate(_auto_cfg(toy_classification))
    path = cfg.data.train

    def mixed(weight):
        sources = [DataSource(path=path), DataSource(path=path, weight=weight, name="again")]
        return cfg.model_copy(update={"data": cfg.data.model_copy(update={"train": sources})})

    assert lr_fingerprint(mixed(1.0), "fp32") == lr_fingerprint(mixed(1.0), "fp32")
    assert lr_fingerprint(mixed(3.0), "fp32") != lr_fingerprint(mixed(1.0), "fp32")
    assert lr_fingerprint(mixed(1.0), "fp32") != lr_fingerprint(cfg, "fp32")


def test_cli_lr_find_stores_prints_json_and_reuses(toy_classification, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from tunelab.cli import app

    raw = _auto_cfg(toy_classification)
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    runner = CliRunner()
    res = runner.invoke(app, ["lr-find", str(cfg_path), "-o", str(tmp_path / "run"), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert out["source"] == "sweep" and out["curve"] and (tmp_path / "run" / "lr_find.json").is_file()
    again = runner.invoke(app, ["lr-find", str(cfg_path), "--json"])
    assert json.loads(again.output.strip().splitlines()[-1])["source"] == "cache"
    bad = runner.invoke(app, ["lr-find", str(tmp_path / "missing.yaml")])
    assert bad.exit_code == 2 and "Traceback" not in bad.output and "missing.yaml" in bad.output


def test_auto_is_refused_where_the_sweep_cannot_run():
    from tunelab.config import config_from_dict
    from tunelab.errors import InputError

    cfg = config_from_dict({"data": {"train": "t.tsv"}, "optim": {"lr": "auto"}})
    assert starting_lr(cfg, False, "fp32") == 1e-4  # the family default until the sweep replaces it
    for sharded, precision in ((False, "fp16"), (True, "fp32")):
        with pytest.raises(InputError) as e:
            starting_lr(cfg, sharded, precision)
        assert e.value.field == "optim.lr"


def test_auto_falls_back_to_the_lr_the_config_would_get_without_it():
    """One definition (defaults.default_lr): a preference run has no family default (recipe_for gives
    none), so `auto` starts from the field's own 2e-5, not the causal-LM SFT value (5e-5 for SmolLM2)."""
    from tunelab.config import OptimConfig, config_from_dict
    from tunelab.defaults import default_lr

    for task, method in (("preference", "full"), ("preference", "lora"), ("chat", "lora"), ("classification", "full")):
        raw = {"task": task, "method": method, "data": {"train": "t.jsonl"}}
        if task != "classification":
            raw["model"] = {"name": "smollm2-135m-instruct"}
        plain = config_from_dict(raw)
        auto = config_from_dict({**raw, "optim": {"lr": "auto"}})
        assert starting_lr(auto, False, "fp32") == default_lr(auto) == plain.optim.lr, (task, method)
    pref = config_from_dict({"task": "preference", "model": {"name": "smollm2-135m-instruct"},
                             "data": {"train": "t.jsonl"}, "optim": {"lr": "auto"}})
    assert starting_lr(pref, False, "fp32") == OptimConfig.model_fields["lr"].default == 2e-5
