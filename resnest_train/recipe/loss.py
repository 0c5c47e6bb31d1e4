"""The loss side of the recipe: label-smoothed cross-entropy and batch mixup.

Mixup uses timm's `Mixup`, which folds label smoothing into the soft targets once (smoothed one-hot of
both images, mixed by lambda), with `SoftTargetCrossEntropy`; without mixup, torch's own label-smoothed
cross-entropy. Both give the same targets when lambda = 1. The loop calls mixup itself and uses what it
returns (timm mixes the batch in place; nothing may rely on that).
"""

from __future__ import annotations

from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch import nn

from resnest_train.config import TrainConfig


def build_criterion(train_cfg: TrainConfig) -> nn.Module:
    if train_cfg.mixup_alpha > 0:
        return SoftTargetCrossEntropy()
    return nn.CrossEntropyLoss(label_smoothing=train_cfg.label_smoothing)


def build_mixup(train_cfg: TrainConfig, num_classes: int) -> Mixup | None:
    if train_cfg.mixup_alpha <= 0:
        return None
    # The ResNeSt recipe mixes whole batches with one lambda ~ Beta(alpha, alpha), for the whole run.
    return Mixup(mixup_alpha=train_cfg.mixup_alpha, cutmix_alpha=0.0, prob=1.0, mode="batch",
                 label_smoothing=train_cfg.label_smoothing, num_classes=num_classes)
