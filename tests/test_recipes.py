"""The recipe configs (configs/resnest50*.yaml): each loads with the values its header cites, and trains a
few steps shrunk to a tiny model on synthetic data, its TensorBoard `train/lr` following its schedule's
formula (written out here, apart from recipe/schedule.py)."""

from __future__ import annotations

import math

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from resnest_train.config_yaml import load_config
from tests.conftest import ROOT, metrics, run_script

CONFIGS = ROOT / "configs"


def test_the_recipes_hold_what_their_headers_cite():
    released = load_config(CONFIGS / "resnest50.yaml")
    pytorch = load_config(CONFIGS / "resnest50_pytorch.yaml")
    a3 = load_config(CONFIGS / "resnest50_rsb_a3.yaml")
    fast = load_config(CONFIGS / "resnest50_fast.yaml")
    assert (released.optim.name, released.schedule.name, released.data.autoaugment) == ("sgd", "cosine", "imagenet")
    assert (pytorch.train.global_batch, pytorch.data.crop, pytorch.data.crop_min_area, pytorch.data.interpolation) \
        == (2048, "efficientnet", 0.1, "bicubic") and pytorch.data.autoaugment.startswith("rand-")
    assert (a3.optim.name, a3.optim.lr * a3.train.global_batch / 256, a3.optim.weight_decay, a3.train.loss,
            a3.train.epochs, a3.data.crop_size, a3.data.val_crop_size) == ("lamb", 8e-3, 0.02, "bce", 100, 160, 224)
    assert (a3.train.mixup_alpha, a3.train.cutmix_alpha, a3.data.autoaugment) == (0.1, 1.0, "rand-m6-mstd0.5-inc1")
    assert (fast.train.epochs, fast.schedule.name, fast.data.progressive_resize, fast.data.val_crop_size) == \
        (88, "linear", (160, 192, 66, 77), 256)
    assert fast.optim.lr * fast.train.global_batch / 256 == pytest.approx(1.7)


def expected_lr(schedule: str, step: int, *, warmup: int, total: int, peak: float) -> float:
    if step < warmup:
        return peak * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - 1 - warmup))
    if schedule == "cosine":
        return 0.5 * peak * (1 + math.cos(math.pi * progress))
    assert schedule == "linear"
    return peak * (1 - progress)


TINY = ["model.name=resnest14", "model.num_classes=4", "data.backend=synthetic", "data.synthetic_size=64",
        "data.crop_size=32", "data.val_crop_size=32", "data.workers=1", "train.epochs=2", "train.global_batch=16",
        "train.batch_size=8", "train.amp=none", "train.log_interval=1", "schedule.warmup_epochs=0.5"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnest50_pytorch", "resnest50_rsb_a3", "resnest50_fast"])
def test_each_recipe_trains_a_few_steps_on_its_schedule(name, tmp_path):
    extra = ["data.progressive_resize=[32,64,1,2]"] if name == "resnest50_fast" else []
    run_script([str(ROOT / "train.py"), "--config", str(CONFIGS / f"{name}.yaml"), f"output_dir={tmp_path}",
                *TINY, *extra])
    resolved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    config = load_config(CONFIGS / f"{name}.yaml")
    assert resolved["optim"]["name"] == config.optim.name and resolved["schedule"]["name"] == config.schedule.name
    peak = config.optim.lr * 16 / 256
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    lrs = [e.value for e in events.Scalars("train/lr")]
    expected = [expected_lr(config.schedule.name, step, warmup=2, total=8, peak=peak) for step in range(8)]
    assert lrs == pytest.approx(expected, rel=1e-6, abs=1e-12)  # float32 events
    rows = metrics(tmp_path)
    assert len(rows) == 2 and all(math.isfinite(row["train_loss"]) for row in rows)
    if name == "resnest50_fast":
        assert [row["train_size"] for row in rows] == [32, 64]
