"""The recipe's loss-side pieces and seeding: label smoothing, mixup, reproducibility.

Mixup uses timm's `Mixup`, which folds label smoothing into the soft targets once (smoothed one-hot of
both images, mixed by lambda), with `SoftTargetCrossEntropy`; without mixup, torch's own label-smoothed
cross-entropy. Both give the same targets when lambda = 1.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch import nn

from resnest_train.config import Config, TrainConfig


def build_criterion(train_cfg: TrainConfig) -> nn.Module:
    if train_cfg.mixup_alpha > 0:
        return SoftTargetCrossEntropy()
    return nn.CrossEntropyLoss(label_smoothing=train_cfg.label_smoothing)


def build_mixup(config: Config) -> Mixup | None:
    train_cfg = config.train
    if train_cfg.mixup_alpha <= 0:
        return None
    # The ResNeSt recipe mixes whole batches with one lambda ~ Beta(alpha, alpha), for the whole run.
    return Mixup(mixup_alpha=train_cfg.mixup_alpha, cutmix_alpha=0.0, prob=1.0, mode="batch",
                 label_smoothing=train_cfg.label_smoothing, num_classes=config.model.num_classes)


def cpu_speed_settings(device: torch.device) -> None:
    """Flush denormal floats to zero on CPU. Denormal gradients slow CPU element-wise kernels by up to 3x,
    depending on the random draw of weights and data (measured: the same loop 4-7% slower end to end,
    BENCHMARKS.md); GPUs flush them in their fast paths anyway, and no training signal lives below 1e-38."""
    if device.type == "cpu":
        torch.set_flush_denormal(True)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        # Bit-identical CPU runs; on CUDA this also needs the cuBLAS workspace setting.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True
