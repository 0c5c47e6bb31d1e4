"""The model as the trainer runs it: built from config, pretrained weights, SyncBN, device, memory format,
DDP and torch.compile; `unwrap` gives back the plain module whose state dict has no wrapper prefixes."""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from resnest_train.config import Config
from resnest_train.distributed import DistInfo
from resnest_train.errors import UserError
from resnest_train.models import create_model, load_pretrained
from resnest_train.models.pretrained import WeightsMismatchError

log = logging.getLogger(__name__)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under DDP (`module.`) and torch.compile (`_orig_mod.`) wrappers."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def load_weights(model: nn.Module, path: str, what: str, name: str) -> None:
    try:
        load_pretrained(model, path)
    except FileNotFoundError:
        raise UserError(f"{what}: file not found: {path}") from None
    except WeightsMismatchError as exc:
        raise UserError(f"{what}: {path} does not fit model {name}: {exc}") from None


def build_model(config: Config, dist: DistInfo, *, pretrained: bool = True) -> nn.Module:
    cfg = config.model
    model = create_model(cfg.name, num_classes=cfg.num_classes, dropout=cfg.dropout,
                         zero_init_last_bn=cfg.zero_init_last_bn, dropblock_prob=cfg.dropblock_prob)
    if pretrained and cfg.pretrained:
        load_weights(model, cfg.pretrained, "model.pretrained", cfg.name)
    if cfg.sync_bn and dist.distributed:
        if dist.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            # torch's SyncBatchNorm runs on GPUs only; a GPU config tried out on CPU still trains.
            log.warning("model.sync_bn=true has no effect on CPU (torch's SyncBatchNorm needs CUDA): "
                        "batch norm statistics stay per process")
    memory_format = torch.channels_last if config.train.channels_last else torch.contiguous_format
    model = model.to(dist.device, memory_format=memory_format)
    if dist.distributed:
        model = DistributedDataParallel(model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    if config.train.compile:
        model = torch.compile(model)
    return model
