"""lr schedules against their formulas, evaluated by hand at chosen steps."""

import math

import pytest
import torch

from tunelab.train.schedules import build_scheduler, lr_factor, warmup_steps_for

pytestmark = pytest.mark.unit


def f(step, name, total=100, warm=10, m=0.0, d=0.1):
    return lr_factor(step, name=name, total_steps=total, warmup_steps=warm, min_lr_ratio=m, decay_ratio=d)


def test_warmup_is_linear_and_never_zero():
    assert f(0, "cosine") == pytest.approx(0.1)
    assert f(4, "linear") == pytest.approx(0.5)
    assert f(9, "constant") == pytest.approx(1.0)


def test_cosine_values():
    # p = (step - 10) / 90
    assert f(10, "cosine") == pytest.approx(1.0)
    assert f(55, "cosine") == pytest.approx(0.5)  # p = 0.5 -> (1 + cos(pi/2)) / 2
    assert f(40, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 30 / 90)))
    assert f(55, "cosine", m=0.2) == pytest.approx(0.2 + 0.8 * 0.5)


def test_linear_and_constant_values():
    assert f(55, "linear") == pytest.approx(0.5)
    assert f(91, "linear", m=0.1) == pytest.approx(0.1 + 0.9 * (1 - 81 / 90))
    assert f(99, "constant") == 1.0


def test_wsd_values():
    # 100 steps, 10 warmup, decay share 0.2 -> decay from step 80 to 100
    assert f(50, "wsd", d=0.2) == 1.0
    assert f(79, "wsd", d=0.2) == 1.0
    assert f(80, "wsd", d=0.2) == pytest.approx(1.0)
    assert f(90, "wsd", d=0.2) == pytest.approx(0.5)
    assert f(95, "wsd", d=0.2, m=0.1) == pytest.approx(0.1 + 0.9 * 0.25)


def test_warmup_steps_from_ratio_or_count():
    assert warmup_steps_for(100, 0.06, None) == 6
    assert warmup_steps_for(101, 0.06, None) == 7  # ceil
    assert warmup_steps_for(100, 0.06, 15) == 15
    assert warmup_steps_for(10, None, 50) == 10


def test_scheduler_drives_every_param_group():
    p1, p2 = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [p1], "lr": 1.0}, {"params": [p2], "lr": 10.0}])
    sched = build_scheduler(opt, total_steps=20, name="linear", warmup_steps=4)
    seen = []
    for _ in range(20):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx([0.25, 2.5])
    assert seen[3] == pytest.approx([1.0, 10.0])
    assert seen[12] == pytest.approx([0.5, 5.0])  # p = (12 - 4) / 16
