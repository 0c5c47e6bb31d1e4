"""Optimizers by name (`optim.name`) over the parameter groups: weight decay on conv/linear weights only,
optionally a classifier lr scale.

The official PyTorch port filtered by name (`'bn' in name`) and so decayed the deep-stem BNs (`conv1.1`,
`conv1.4`) and the downsample BNs; here every parameter with fewer than two dimensions (all biases and
all normalization weights, wherever they sit) is exempt, which needs no naming convention at all.

`OPTIMIZERS` is the one table of names: each entry builds its optimizer from the groups and names the
`optim.*` keys it reads beyond those every optimizer reads (lr, weight_decay, no_bn_bias_decay,
head_lr_scale, clip_grad). A key set away from its default that the chosen optimizer does not read is said
once in the log (rank 0; as train.amp is where unsupported) and otherwise ignored: the base config holds
every key, so a key's mere presence cannot be an error. LARS and LAMB are timm's classes (timm/optim/lars.py,
timm/optim/lamb.py), AdamW is torch's; each runs with `optim.weight_decay` as given (an L2 term in the
gradient for sgd, lars and lamb, decoupled for adamw).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from resnest_train.config import OptimConfig

log = logging.getLogger("resnest_train")


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


def _eps(optim_cfg: OptimConfig) -> dict:
    """`optim.eps: null` keeps each optimizer's own default (timm's Lars 1e-8, timm's Lamb 1e-6, AdamW 1e-8)."""
    return {} if optim_cfg.eps is None else {"eps": optim_cfg.eps}


def _sgd(groups: list[dict], lr: float, optim_cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=lr, momentum=optim_cfg.momentum, nesterov=optim_cfg.nesterov)


def _lars(groups: list[dict], lr: float, optim_cfg: OptimConfig) -> torch.optim.Optimizer:
    """LARS (arXiv 1708.03888) as MLPerf's ResNet-50 reference runs it: the trust ratio adapts the conv and
    linear weights and never the BN parameters and biases (its skip list), without LARC's clipping of the
    ratio (timm's trust_clip=False). timm's Lars adapts a group only when its weight_decay != 0 unless the
    group says `always_adapt`; the weight groups say it here, so they are adapted at weight_decay 0 too,
    and the no-decay groups (optim.no_bn_bias_decay) take plain momentum steps. With no_bn_bias_decay=false
    every parameter is in a decay group and adapted, as timm's own create_optimizer_v2 without its filter.
    timm applies the lr after the momentum (as torch's SGD), MLPerf's TF reference inside it (lr x trust
    ratio in the velocity): the two differ only while the lr changes."""
    from timm.optim import Lars  # imported here: timm is needed by the optimizers that are its own only

    for group in groups:
        no_decay = optim_cfg.no_bn_bias_decay and all(p.ndim <= 1 for p in group["params"])
        group["always_adapt"] = not no_decay
    return Lars(groups, lr=lr, momentum=optim_cfg.momentum, nesterov=optim_cfg.nesterov,
                trust_coeff=optim_cfg.trust_coeff, trust_clip=False, **_eps(optim_cfg))


def _lamb(groups: list[dict], lr: float, optim_cfg: OptimConfig) -> torch.optim.Optimizer:
    """timm's Lamb with its defaults otherwise, as timm's RSB runs used it: bias correction, and the global
    gradient norm clipped at 1.0 inside the step (max_grad_norm, NVIDIA FusedLAMB's default), after any
    optim.clip_grad. The no-decay groups are not adapted (timm: only weight_decay != 0 groups are)."""
    from timm.optim import Lamb

    return Lamb(groups, lr=lr, betas=tuple(optim_cfg.betas), **_eps(optim_cfg))


def _adamw(groups: list[dict], lr: float, optim_cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(optim_cfg.betas), **_eps(optim_cfg))


@dataclass(frozen=True)
class OptimizerEntry:
    build: Callable[[list[dict], float, OptimConfig], torch.optim.Optimizer]
    keys: tuple[str, ...]  # the optim.* keys of its own that it reads


OPTIMIZERS: dict[str, OptimizerEntry] = {
    "sgd": OptimizerEntry(_sgd, ("momentum", "nesterov")),
    "lars": OptimizerEntry(_lars, ("momentum", "nesterov", "trust_coeff", "eps")),
    "lamb": OptimizerEntry(_lamb, ("betas", "eps")),
    "adamw": OptimizerEntry(_adamw, ("betas", "eps")),
}
_OWN_KEYS = ("momentum", "nesterov", "betas", "eps", "trust_coeff")


def ignored_keys(optim_cfg: OptimConfig) -> list[str]:
    """The optimizer-specific keys set away from their defaults that `optim.name` does not read."""
    read = OPTIMIZERS[optim_cfg.name].keys
    defaults = {f.name: f.default for f in dataclasses.fields(optim_cfg)}
    return [f"optim.{key}" for key in _OWN_KEYS
            if key not in read and getattr(optim_cfg, key) != defaults[key]]


def build_optimizer(model: nn.Module, optim_cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """`optim.name`'s optimizer over `param_groups`; the trainer sets each group's lr every step (x lr_scale)."""
    groups = param_groups(model, optim_cfg.weight_decay, head_lr_scale=optim_cfg.head_lr_scale,
                          no_bn_bias_decay=optim_cfg.no_bn_bias_decay)
    if ignored := ignored_keys(optim_cfg):
        log.info("%s not read by optim.name=%s: ignored", ", ".join(ignored), optim_cfg.name)
    return OPTIMIZERS[optim_cfg.name].build(groups, lr, optim_cfg)
