"""The loss side of the recipe: label-smoothed cross-entropy or binary cross-entropy, and batch mixing.

Mixup and CutMix (mixing.py, timm's Mixup semantics) fold label smoothing into the soft targets once
(smoothed one-hot of both images, mixed by lambda), with `SoftTargetCrossEntropy`; without mixing, torch's
own label-smoothed cross-entropy. Both give the same targets when lambda = 1. The loop calls the mix itself,
with the micro-batch's generator, and uses what it returns.

`train.loss: bce` is timm's `BinaryCrossEntropy` (one sigmoid per class, as in "ResNet strikes back",
arXiv 2110.00476): hard targets are smoothed by it, soft ones (mixing) are taken as they are, both
optionally binarised at `train.bce_target_threshold`; as timm's train.py sets it up.
"""

from __future__ import annotations

import torch
from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy
from torch import nn

from resnest_train.config import TrainConfig
from resnest_train.recipe.mixing import BatchMix


class Float32BinaryCrossEntropy(nn.Module):
    """timm's BinaryCrossEntropy computed in float32 with autocast off: under bf16/fp16 autocast the logits
    (and the targets timm builds in their dtype) would otherwise hold smoothed values such as 0.9001 as
    0.8984 in bf16, and the sigmoid's log would lose the small probabilities."""

    def __init__(self, *, smoothing: float, target_threshold: float | None):
        super().__init__()
        self.bce = BinaryCrossEntropy(smoothing=smoothing, target_threshold=target_threshold)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.autocast(logits.device.type, enabled=False):
            return self.bce(logits.float(), targets.float() if targets.is_floating_point() else targets)


def build_criterion(train_cfg: TrainConfig) -> nn.Module:
    if train_cfg.loss == "bce":
        return Float32BinaryCrossEntropy(smoothing=train_cfg.label_smoothing,
                                         target_threshold=train_cfg.bce_target_threshold)
    if train_cfg.mixing:
        return SoftTargetCrossEntropy()
    return nn.CrossEntropyLoss(label_smoothing=train_cfg.label_smoothing)


def build_mixup(train_cfg: TrainConfig, num_classes: int) -> BatchMix | None:
    if not train_cfg.mixing:
        return None
    # The ResNeSt recipe mixes whole batches with one lambda ~ Beta(alpha, alpha), for the whole run.
    return BatchMix(mixup_alpha=train_cfg.mixup_alpha, cutmix_alpha=train_cfg.cutmix_alpha,
                    mix_prob=train_cfg.mix_prob, switch_prob=train_cfg.mix_switch_prob,
                    label_smoothing=train_cfg.label_smoothing, num_classes=num_classes)
