"""The step plan and the learning rate: warmup from 0 to the peak, then cosine, step, poly or linear."""

from __future__ import annotations

import math

import pytest

from resnest_train.config import ConfigError
from resnest_train.config_yaml import load_config
from resnest_train.recipe.schedule import build_train_plan, learning_rate, micro_batch_warning
from tests.conftest import ROOT


def test_schedule_endpoints():
    kw = dict(total_steps=100, warmup_steps=10, peak_lr=0.4, min_lr=0.0)
    assert learning_rate(0, **kw) == 0.0
    assert learning_rate(5, **kw) == pytest.approx(0.2)
    assert learning_rate(10, **kw) == pytest.approx(0.4)
    assert learning_rate(99, **kw) == pytest.approx(0.0, abs=1e-12)
    values = [learning_rate(s, **kw) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(values, values[1:]))


IMAGENET_TRAIN = 1_281_167


def test_plan_derives_every_value_once():
    config = load_config(ROOT / "configs" / "resnest50.yaml")
    plan = build_train_plan(config, world_size=64, num_images=IMAGENET_TRAIN)
    assert plan.global_batch == 8192 and plan.peak_lr == pytest.approx(3.2)  # the published R50 run
    assert plan.total_steps == 270 * 156 and plan.warmup_steps == 5 * 156
    assert plan.lr(plan.warmup_steps) == pytest.approx(3.2) and plan.lr(plan.total_steps - 1) == pytest.approx(0)
    assert plan.dropblock(0) == 0 and plan.dropblock(plan.total_steps) == pytest.approx(0.1)
    assert plan.derived() == {"world_size": 64, "global_batch": 8192, "micro_batch": 128, "accumulation": 1,
                              "lr": plan.peak_lr, "steps_per_epoch": 156, "total_steps": 270 * 156,
                              "warmup_steps": 780}


@pytest.mark.parametrize("world_size,accumulation", [(1, 64), (8, 8), (64, 1)])
def test_the_published_recipe_on_any_process_count(world_size, accumulation):
    """ResNeSt-50 on 1, 8 or 64 processes: the same global batch, lr, steps and warmup; only the
    accumulation steps change."""
    plan = build_train_plan(load_config(ROOT / "configs" / "resnest50.yaml"), world_size, IMAGENET_TRAIN)
    derived = plan.derived()
    assert derived == {"world_size": world_size, "global_batch": 8192, "micro_batch": 128,
                       "accumulation": accumulation, "lr": pytest.approx(3.2), "steps_per_epoch": 156,
                       "total_steps": 270 * 156, "warmup_steps": 780}


def test_a_global_batch_that_does_not_split_names_the_valid_micro_batches():
    config = load_config(ROOT / "configs" / "resnest50.yaml")
    with pytest.raises(ConfigError) as three:
        build_train_plan(config, 3, IMAGENET_TRAIN)
    assert str(three.value).startswith("train.global_batch=8192 cannot be split over 3 processes")
    assert "process counts that divide it: 1, 2, 4, 8" in str(three.value)
    with pytest.raises(ConfigError, match=r"valid train.batch_size for 8 processes: 2, 4, 8, 16, 32, 64, 128, "
                                          r"256, 512, 1024$"):
        build_train_plan(load_config(ROOT / "configs" / "resnest50.yaml", ["train.batch_size=96"]), 8,
                         IMAGENET_TRAIN)
    odd = load_config(ROOT / "configs" / "resnest50.yaml", ["train.global_batch=96", "train.batch_size=12"])
    with pytest.raises(ConfigError, match="valid train.batch_size for 3 processes: 2, 4, 8, 16, 32$"):
        build_train_plan(odd, 3, IMAGENET_TRAIN)  # even sizes only: mixup pairs the images of a micro-batch


def test_a_global_batch_no_even_micro_batch_divides_names_the_fix():
    """train.global_batch=33 with mixup listed an empty set of valid batch sizes."""
    config = load_config(ROOT / "configs" / "demo.yaml", ["train.global_batch=33", "train.batch_size=8"])
    with pytest.raises(ConfigError, match=r"train.global_batch=33 gives each of 1 processes 33 images, which no "
                                          r"even train.batch_size divides .*: use train.global_batch=32 or 34, or "
                                          r"train.mixup_alpha=0 train.cutmix_alpha=0$"):
        build_train_plan(config, 1, IMAGENET_TRAIN)


@pytest.mark.parametrize("name,global_batch", [("resnest50", 8192), ("resnest101", 4096), ("resnest200", 2048),
                                               ("resnest269", 2048)])
def test_published_configs_fix_the_published_global_batch(name, global_batch):
    config = load_config(ROOT / "configs" / f"{name}.yaml")
    assert config.train.global_batch == global_batch == 64 * config.train.batch_size


def test_null_global_batch_is_the_micro_batch_times_the_processes():
    config = load_config(ROOT / "configs" / "demo.yaml")
    plan = build_train_plan(config, 4, 600)
    assert config.train.global_batch is None and plan.global_batch == 4 * 32 and plan.layout.accumulation == 1
    with pytest.raises(ConfigError, match="larger than the 100 training images"):
        build_train_plan(config, 4, 100)


def test_a_published_global_batch_on_a_small_dataset_names_the_fix():
    config = load_config(ROOT / "configs" / "resnest50.yaml")
    with pytest.raises(ConfigError, match=r"train.global_batch=8192 is larger than the 80 training images: .*"
                                          r"train.global_batch=null uses train.batch_size x processes"):
        build_train_plan(config, 1, 80)


def test_a_micro_batch_below_16_without_sync_bn_is_warned_about():
    assert "train.batch_size=8 per process is below 16" in micro_batch_warning(8, sync_bn=False)
    assert "model.sync_bn=true" in micro_batch_warning(8, sync_bn=False)
    assert micro_batch_warning(8, sync_bn=True) is None and micro_batch_warning(16, sync_bn=False) is None


def _todays_cosine(step: int, *, total_steps: int, warmup_steps: int, peak_lr: float, min_lr: float) -> float:
    """The lr before schedule.name had a choice, kept verbatim: the defaults must reproduce it bit for bit."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    decay_steps = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


@pytest.mark.parametrize("config,overrides", [("resnest50.yaml", []), ("demo.yaml", ["schedule.min_lr=0.003"])])
def test_default_schedule_is_todays_cosine_bit_for_bit(config, overrides):
    plan = build_train_plan(load_config(ROOT / "configs" / config, overrides), 64, IMAGENET_TRAIN)
    kw = dict(total_steps=plan.total_steps, warmup_steps=plan.warmup_steps, peak_lr=plan.peak_lr, min_lr=plan.min_lr)
    assert plan.decay.name == "cosine" and plan.warmup_steps > 0
    assert [plan.lr(s) for s in range(plan.total_steps)] == [_todays_cosine(s, **kw) for s in range(plan.total_steps)]
    assert learning_rate(123, **kw) == _todays_cosine(123, **kw)


# demo.yaml on 320 images: batch 32, 10 steps per epoch, 12 epochs = 120 steps, 1 warmup epoch, peak 0.05
PEAK, WARMUP, TOTAL, MIN_LR = 0.4 * 32 / 256, 10, 120, 0.004


def _expected(name: str, step: int) -> float:
    """Each schedule written out from its source, independently of recipe/schedule.py."""
    if step < WARMUP:
        return PEAK * step / WARMUP
    progress = min(1.0, (step - WARMUP) / (TOTAL - 1 - WARMUP))
    if name == "step":  # timm's StepLRScheduler: t from the start of training, decay_t = 2.5 epochs = 25 steps
        return max(MIN_LR, PEAK * 0.5 ** math.floor(step / 25))
    if name == "poly":  # MLPerf: (peak - end) (1 - t/T)^power + end
        return (PEAK - MIN_LR) * (1 - progress) ** 3 + MIN_LR
    if name == "linear":
        return PEAK - (PEAK - MIN_LR) * progress
    return MIN_LR + (PEAK - MIN_LR) * (1 + math.cos(math.pi * progress)) / 2


@pytest.mark.parametrize("name", ["cosine", "step", "poly", "linear"])
def test_each_schedule_is_its_formula_at_every_step(name):
    overrides = [f"schedule.name={name}", f"schedule.min_lr={MIN_LR}", "schedule.decay_epochs=2.5",
                 "schedule.decay_rate=0.5", "schedule.power=3"]
    plan = build_train_plan(load_config(ROOT / "configs" / "demo.yaml", overrides), 1, 320)
    assert (plan.peak_lr, plan.warmup_steps, plan.total_steps) == (PEAK, WARMUP, TOTAL)
    lrs = [plan.lr(s) for s in range(TOTAL)]
    assert lrs == pytest.approx([_expected(name, s) for s in range(TOTAL)], rel=1e-12, abs=1e-15)
    assert lrs[0] == 0.0 and lrs[WARMUP] == pytest.approx(PEAK) and min(lrs[WARMUP:]) >= MIN_LR - 1e-15
    assert all(a >= b for a, b in zip(lrs[WARMUP:], lrs[WARMUP + 1:]))
    if name != "step":
        assert lrs[-1] == pytest.approx(MIN_LR)


def test_step_schedule_decays_on_its_interval_and_stops_at_min_lr():
    plan = build_train_plan(load_config(ROOT / "configs" / "demo.yaml", [
        "schedule.name=step", f"schedule.min_lr={MIN_LR}", "schedule.decay_epochs=2.5", "schedule.decay_rate=0.5"]),
        1, 320)
    assert plan.lr(24) == PEAK and plan.lr(25) == PEAK / 2 and plan.lr(99) == PEAK / 8
    assert plan.lr(100) == MIN_LR  # PEAK / 16 = 0.003125 is below it
