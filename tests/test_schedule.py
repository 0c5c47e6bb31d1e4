"""The step plan and the learning rate: warmup from 0 to the peak, cosine to min_lr at the last step."""

from __future__ import annotations

import pytest

from resnest_train.config import load_config
from resnest_train.schedule import build_train_plan, learning_rate
from tests.conftest import ROOT


def test_schedule_endpoints():
    kw = dict(total_steps=100, warmup_steps=10, peak_lr=0.4, min_lr=0.0)
    assert learning_rate(0, **kw) == 0.0
    assert learning_rate(5, **kw) == pytest.approx(0.2)
    assert learning_rate(10, **kw) == pytest.approx(0.4)
    assert learning_rate(99, **kw) == pytest.approx(0.0, abs=1e-12)
    values = [learning_rate(s, **kw) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_plan_derives_every_value_once():
    config = load_config(ROOT / "configs" / "resnest50.yaml")
    plan = build_train_plan(config, world_size=64, steps_per_epoch=156)
    assert plan.global_batch == 8192 and plan.peak_lr == pytest.approx(3.2)  # the published R50 run
    assert plan.total_steps == 270 * 156 and plan.warmup_steps == 5 * 156
    assert plan.lr(plan.warmup_steps) == pytest.approx(3.2) and plan.lr(plan.total_steps - 1) == pytest.approx(0)
    assert plan.dropblock(0) == 0 and plan.dropblock(plan.total_steps) == pytest.approx(0.1)
    assert plan.derived() == {"world_size": 64, "global_batch": 8192, "lr": plan.peak_lr, "steps_per_epoch": 156,
                              "total_steps": 270 * 156, "warmup_steps": 780}
