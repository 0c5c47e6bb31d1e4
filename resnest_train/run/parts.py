"""What a run trains with, each part built from the config section it belongs to: the model placed and
wrapped for the processes (`model.*`, `train.channels_last/compile`), the optimizer (`optim.*`), the
GradScaler and autocast (`train.amp`), the criterion and the batch mix (`train.loss/label_smoothing/mixup`),
and the weight EMA (`train.ema*`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from resnest_train.cluster.distributed import DistInfo
from resnest_train.config import Config
from resnest_train.recipe.averaging import WeightEma, build_ema
from resnest_train.recipe.engine import Precision, resolve_precision
from resnest_train.recipe.loss import build_criterion, build_mixup
from resnest_train.recipe.mixing import BatchMix
from resnest_train.recipe.optim import build_optimizer
from resnest_train.recipe.schedule import TrainPlan
from resnest_train.run.wrapping import place, unwrap, wrap_for_training


@dataclass(frozen=True)
class Parts:
    model: nn.Module  # placed on the device, SyncBN/DDP/compile as configured
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    precision: Precision
    criterion: nn.Module
    mixup: BatchMix | None  # mixup and/or CutMix (train.mixup_alpha, train.cutmix_alpha)
    ema: WeightEma | None  # the weight EMA (train.ema > 0)


def build_parts(config: Config, model: nn.Module, plan: TrainPlan, dist: DistInfo) -> Parts:
    """`model`: the plain model holding its starting weights (rank 0's reach the others through DDP)."""
    train = config.train
    model = wrap_for_training(place(model, dist, channels_last=train.channels_last), dist,
                              sync_bn=config.model.sync_bn, compile_model=train.compile,
                              accumulation=plan.layout.accumulation)
    precision = resolve_precision(train.amp, dist.device)
    return Parts(
        model=model, optimizer=build_optimizer(unwrap(model), config.optim, plan.peak_lr),
        scaler=torch.amp.GradScaler(dist.device.type, enabled=precision.needs_scaler), precision=precision,
        criterion=build_criterion(train), mixup=build_mixup(train, config.model.num_classes),
        ema=build_ema(unwrap(model), train.ema, warmup=train.ema_warmup, device_setting=train.ema_device,
                      device=dist.device))
