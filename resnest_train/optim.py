"""Optimizer parameter groups: weight decay on conv/linear weights only.

The official PyTorch port filtered by name (`'bn' in name`) and so decayed the deep-stem BNs (`conv1.1`,
`conv1.4`) and the downsample BNs; here every parameter with fewer than two dimensions (all biases and
all normalization weights, wherever they sit) is exempt, which needs no naming convention at all.
"""

from __future__ import annotations

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, optim_cfg, lr: float) -> torch.optim.Optimizer:
    if optim_cfg.no_bn_bias_decay:
        groups = param_groups(model, optim_cfg.weight_decay)
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad],
                   "weight_decay": optim_cfg.weight_decay}]
    return torch.optim.SGD(groups, lr=lr, momentum=optim_cfg.momentum, nesterov=optim_cfg.nesterov)
