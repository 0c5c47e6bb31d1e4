"""Label smoothing folded into mixup's soft targets once; the synthetic backend's batches survive mixup;
train.loss=bce is timm's BinaryCrossEntropy (hard and soft targets, threshold), in float32 under autocast."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy

from resnest_train.config import TrainConfig
from resnest_train.config_yaml import load_config
from resnest_train.data import build_train_loader
from resnest_train.recipe.loss import Float32BinaryCrossEntropy, build_criterion, build_mixup
from tests.conftest import ROOT, make_order, make_plan


def test_mixup_with_label_smoothing_targets():
    config = load_config(ROOT / "configs" / "resnest50.yaml", ["model.num_classes=5"])
    mixup = build_mixup(config.train, config.model.num_classes)
    images = torch.randn(4, 3, 8, 8)
    targets = torch.tensor([0, 1, 2, 3])
    mixed_images, soft = mixup(images, targets, np.random.RandomState(0))
    assert torch.allclose(soft.sum(dim=1), torch.ones(4))
    # recover lambda from the images, then check the recipe's formula: smoothing applied once, then mixed
    lam = ((mixed_images - images.flip(0)) / (images - images.flip(0))).median().item()
    smooth = lambda y: torch.nn.functional.one_hot(y, 5) * (1 - 0.1) + 0.1 / 5  # noqa: E731
    expected = lam * smooth(targets) + (1 - lam) * smooth(targets.flip(0))
    assert torch.allclose(soft, expected, atol=1e-5)


def test_synthetic_batches_are_not_collapsed_by_mixup(tmp_path):
    """timm mixed in place: a loader yielding one shared tensor would have turned into identical pairs."""
    config = load_config(ROOT / "configs" / "demo.yaml", ["model.num_classes=4"])
    mixup = build_mixup(config.train, 4)
    loader = build_train_loader(make_plan(tmp_path, backend="synthetic", synthetic_size=8 * 30), None,
                                make_order(8 * 30, 8))
    loader.set_epoch(0)
    batches = [mixup(images, targets, np.random.RandomState(step))[0] for step, (images, targets) in
               enumerate(loader)]
    last = batches[-1]
    assert len(batches) == 30
    assert (last - last.flip(0)).abs().mean() > 0.1  # the pairs are still different images


def test_criterion_per_config():
    assert isinstance(build_criterion(TrainConfig(mixup_alpha=0.0)), torch.nn.CrossEntropyLoss)
    assert isinstance(build_criterion(TrainConfig(mixup_alpha=0.0, cutmix_alpha=1.0)), SoftTargetCrossEntropy)
    bce = build_criterion(TrainConfig(loss="bce", label_smoothing=0.2, bce_target_threshold=0.3))
    assert isinstance(bce, Float32BinaryCrossEntropy)
    assert (bce.bce.smoothing, bce.bce.target_threshold) == (0.2, 0.3)


def _logits_and_targets(classes: int = 7) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, classes, generator=generator) * 3
    hard = torch.randint(0, classes, (6,), generator=generator)
    soft = torch.softmax(torch.randn(6, classes, generator=generator) * 2, dim=1)  # as mixup/CutMix give
    return logits, hard, soft


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("threshold", [None, 0.2])
def test_bce_equals_timm_on_hard_and_soft_targets(smoothing, threshold):
    logits, hard, soft = _logits_and_targets()
    ours = build_criterion(TrainConfig(loss="bce", label_smoothing=smoothing, bce_target_threshold=threshold))
    timm = BinaryCrossEntropy(smoothing=smoothing, target_threshold=threshold)
    for targets in (hard, soft):
        assert torch.equal(ours(logits, targets), timm(logits, targets))
    # timm's definition, written out: smoothed one-hot (or soft targets), optional threshold, mean BCE
    dense = torch.nn.functional.one_hot(hard, 7) * (1 - smoothing) + smoothing / 7
    if threshold is not None:
        dense = (dense > threshold).float()
    expected = -(dense * torch.log(torch.sigmoid(logits)) + (1 - dense) * torch.log(1 - torch.sigmoid(logits)))
    torch.testing.assert_close(ours(logits, hard), expected.mean())


def test_bce_is_float32_under_autocast():
    """bf16 logits under autocast: the loss is timm's on the same logits in float32 (not bf16 targets and
    a bf16 log-sigmoid), and its gradient reaches the bf16 logits."""
    logits, hard, soft = _logits_and_targets(classes=1000)
    ours = build_criterion(TrainConfig(loss="bce", label_smoothing=0.1))
    timm = BinaryCrossEntropy(smoothing=0.1)
    low = logits.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = [ours(low, hard), ours(low, soft.bfloat16())]
    assert all(loss.dtype == torch.float32 for loss in losses)
    assert torch.equal(losses[0], timm(low.detach().float(), hard))
    assert torch.equal(losses[1], timm(low.detach().float(), soft.bfloat16().float()))
    losses[0].backward()
    assert low.grad.dtype == torch.bfloat16 and low.grad.abs().sum() > 0
