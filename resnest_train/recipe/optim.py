"""Optimizer parameter groups: weight decay on conv/linear weights only; optionally a classifier lr scale.

The official PyTorch port filtered by name (`'bn' in name`) and so decayed the deep-stem BNs (`conv1.1`,
`conv1.4`) and the downsample BNs; here every parameter with fewer than two dimensions (all biases and
all normalization weights, wherever they sit) is exempt, which needs no naming convention at all.
"""

from __future__ import annotations

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float, *, head_lr_scale: float = 1.0,
                 no_bn_bias_decay: bool = True) -> list[dict]:
    """[decay, no_decay] groups of the trainable parameters; with head_lr_scale != 1 the classifier (`fc.`)
    gets groups of its own whose `lr_scale` the trainer multiplies the schedule's lr by."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        head = head_lr_scale != 1.0 and name.startswith("fc.")
        groups.setdefault((head, no_bn_bias_decay and param.ndim <= 1), []).append(param)
    order = [(False, False), (False, True), (True, False), (True, True)]
    return [{"params": groups.get(key, []), "weight_decay": 0.0 if key[1] else weight_decay,
             "lr_scale": head_lr_scale if key[0] else 1.0}
            for key in order if key in groups or not key[0]]


def build_optimizer(model: nn.Module, optim_cfg, lr: float) -> torch.optim.Optimizer:
    groups = param_groups(model, optim_cfg.weight_decay, head_lr_scale=optim_cfg.head_lr_scale,
                          no_bn_bias_decay=optim_cfg.no_bn_bias_decay)
    return torch.optim.SGD(groups, lr=lr, momentum=optim_cfg.momentum, nesterov=optim_cfg.nesterov)
