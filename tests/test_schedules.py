"""Learning-rate schedules against torch.optim.lr_scheduler, and warm-up by hand."""

from __future__ import annotations

import json
import math

import pytest
import torch

from unrolled.train.lr_schedules import (
    Constant,
    Cosine,
    Exponential,
    StepDecay,
    Warmup,
    make_schedule,
    schedule_from_dict,
)


def _torch_lrs(make, lr, steps):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    sched = make(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("ours, theirs, steps", [
    (StepDecay(0.5, step_size=7, gamma=0.3), lambda o: torch.optim.lr_scheduler.StepLR(o, 7, gamma=0.3), 40),
    (Exponential(0.5, gamma=0.97), lambda o: torch.optim.lr_scheduler.ExponentialLR(o, 0.97), 60),
    (Cosine(0.5, total_steps=50), lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 50), 51),
    (Cosine(0.5, total_steps=30, min_lr=0.01),
     lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 30, eta_min=0.01), 31),
])
def test_matches_torch(ours, theirs, steps):
    expected = _torch_lrs(theirs, ours.lr, steps)
    for step, lr in enumerate(expected):
        assert ours.lr_at(step) == pytest.approx(lr, rel=1e-12, abs=1e-15), step


def test_constant():
    assert [Constant(0.1).lr_at(s) for s in (0, 1, 10**6)] == [0.1, 0.1, 0.1]


def test_cosine_holds_min_after_total():
    c = Cosine(1.0, total_steps=10, min_lr=0.1)
    assert c.lr_at(5) == pytest.approx(0.55)
    assert c.lr_at(10) == c.lr_at(11) == c.lr_at(1000) == pytest.approx(0.1)


def test_warmup_by_hand():
    w = Warmup(StepDecay(0.8, step_size=2, gamma=0.5), warmup_steps=3)
    assert [w.lr_at(s) for s in range(8)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 0.8, 0.4, 0.4, 0.2])
    assert Warmup(Constant(0.3), 0).lr_at(0) == 0.3


def test_make_schedule_cosine_counts_the_whole_run():
    s = make_schedule("cosine", 1.0, total_steps=110, warmup_steps=10, min_lr=0.01)
    assert s == Warmup(Cosine(1.0, 100, 0.01), 10)
    assert s.lr_at(9) == pytest.approx(10 / 11)
    assert s.lr_at(10) == 1.0
    assert s.lr_at(110) == pytest.approx(0.01)
    assert make_schedule("constant", 0.1) == Constant(0.1)
    assert make_schedule("step", 0.1, step_size=5) == StepDecay(0.1, 5, 0.1)
    assert make_schedule("exponential", 0.1, gamma=0.9, warmup_steps=2) == Warmup(Exponential(0.1, 0.9), 2)


@pytest.mark.parametrize("s", [
    Constant(0.1), StepDecay(0.1, 3, 0.5), Exponential(0.2, 0.99), Cosine(0.3, 100, 1e-4),
    Warmup(Cosine(0.3, 100), 20),
])
def test_json_round_trip(s):
    d = json.loads(json.dumps(s.to_dict()))
    back = schedule_from_dict(d)
    assert back == s
    assert [back.lr_at(k) for k in range(0, 200, 7)] == [s.lr_at(k) for k in range(0, 200, 7)]


def test_to_dict_shape():
    assert Warmup(Cosine(0.3, 100), 20).to_dict() == {
        "kind": "warmup", "warmup_steps": 20, "base": {"kind": "cosine", "lr": 0.3, "total_steps": 100, "min_lr": 0.0}}


@pytest.mark.parametrize("d, match", [
    ({"kind": "linear", "lr": 1}, "unknown schedule kind 'linear'; known kinds: constant, step"),
    ({"lr": 1}, "must be a dict with a 'kind'"),
    ({"kind": "step", "lr": 1}, "step schedule needs 'step_size'"),
    ({"kind": "constant", "lr": 1, "gamma": 2}, "constant schedule has no field 'gamma'"),
    ({"kind": "step", "lr": 1, "step_size": 0}, "step_size must be at least 1"),
    ({"kind": "exponential", "lr": 1, "gamma": 1.5}, r"gamma must be in \[0, 1.0\]"),
    ({"kind": "cosine", "lr": 0.1, "total_steps": 10, "min_lr": 0.2}, "min_lr 0.2 is above lr 0.1"),
    ({"kind": "warmup", "warmup_steps": 3, "base": {"kind": "warmup", "warmup_steps": 1,
                                                    "base": {"kind": "constant", "lr": 1}}}, "base must be"),
])
def test_bad_configs(d, match):
    with pytest.raises(ValueError, match=match):
        schedule_from_dict(d)


def test_bad_make_schedule_and_steps():
    with pytest.raises(ValueError, match="leaves no steps after a warm-up of 10"):
        make_schedule("cosine", 0.1, total_steps=10, warmup_steps=10)
    with pytest.raises(ValueError, match="unknown schedule 'linear'"):
        make_schedule("linear", 0.1)
    with pytest.raises(ValueError, match="exponential schedule needs gamma"):
        make_schedule("exponential", 0.1)
    with pytest.raises(ValueError, match="counts from 0"):
        Constant(0.1).lr_at(-1)
    assert not math.isnan(Exponential(1.0, 0.5).lr_at(10**5))  # underflows to 0 quietly
