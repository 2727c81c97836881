"""Learning-rate schedule: warmup, decay styles, clamping past the horizon, resumability."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from megatron_glm.config import OptimizerConfig
from megatron_glm.training.lr_schedule import LRSchedule, LRScheduler


@pytest.mark.parametrize("style", ["linear", "cosine", "constant"])
def test_schedule_shape(style: str) -> None:
    s = LRSchedule(max_lr=1.0, min_lr=0.1, warmup_steps=10, decay_steps=110, style=style)
    assert s(0) == pytest.approx(0.1) and s(9) == pytest.approx(1.0)  # linear warmup reaches the peak
    assert s(10) == pytest.approx(1.0)
    mid = {"linear": 0.55, "cosine": 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)), "constant": 1.0}[style]
    assert s(60) == pytest.approx(mid)
    end = 1.0 if style == "constant" else 0.1
    for step in (110, 111, 500, 10**6):  # never below the floor (the original went negative)
        assert s(step) == pytest.approx(end)
    values = [s(i) for i in range(10, 200)]
    assert all(a >= b - 1e-12 for a, b in itertools.pairwise(values))


def test_from_config_fraction_and_defaults() -> None:
    cfg = OptimizerConfig(lr=2.0, min_lr=0.0, lr_warmup_fraction=0.1, lr_decay_style="linear")
    s = LRSchedule.from_config(cfg, train_iters=50)
    assert (s.warmup_steps, s.decay_steps) == (5, 50)
    s2 = LRSchedule.from_config(OptimizerConfig(lr_warmup_iters=3, lr_decay_iters=20), train_iters=50)
    assert (s2.warmup_steps, s2.decay_steps) == (3, 20)


def test_scheduler_resumes_from_state_dict() -> None:
    sched = LRSchedule(max_lr=1.0, min_lr=0.0, warmup_steps=2, decay_steps=10, style="cosine")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=123.0)
    a = LRScheduler(opt, sched)
    assert a.get_last_lr() == [sched(0)]
    for _ in range(6):
        a.step()
    state = a.state_dict()
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    b = LRScheduler(opt2, sched)
    b.load_state_dict(state)
    assert b.get_last_lr() == a.get_last_lr() == [sched(6)]
