"""Averages: of the weights over the optimizer steps (weight EMA) and of BatchNorm statistics over the
ranks (`train.dist_bn`).

Weight EMA, as timm's `ModelEmaV3` and torchvision's reference `ExponentialMovingAverage(use_buffers=True)`
keep it: after each optimizer step, every floating-point tensor of the model's state (parameters and BN
running statistics) moves towards the model's, `ema = decay * ema + (1 - decay) * model`, with one decay
per optimizer step of the global batch, so it means the same on any number of processes. With
`train.ema_warmup` the decay ramps up as `1 - (1 + step) ** (-2/3)` (timm's warm-up) until it reaches
`train.ema`. The parameters are the same on every rank (DDP); each rank's BN statistics are its own, so the
checkpoint keeps each rank's (`rank_buffers`) and a resumed run continues bit-exactly.

BN statistics: before each evaluation, every rank's running mean and variance become the mean over the
ranks (`reduce`, timm's `--dist-bn reduce`: the statistics of every rank's data, not 1/64 of it) or rank
0's (`broadcast`); the other buffers (counters) are rank 0's. Every rank then evaluates, and rank 0 saves,
the same model. A checkpoint written between evaluations saves the same mean (`saved_statistics`) while
each rank trains on with its own statistics (also saved, per rank, for an exact resume).
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from resnest_train.cluster.distributed import DistInfo

log = logging.getLogger("resnest_train")

WARMUP_POWER = 2 / 3  # timm ModelEmaV3's warm-up: decay = 1 - (1 + step / gamma) ** -power, gamma = 1


def _bn_statistic(name: str) -> bool:
    return name.endswith("running_mean") or name.endswith("running_var")


@torch.no_grad()
def distribute_bn(module: nn.Module, dist: DistInfo, mode: str) -> None:
    """`mode` reduce: each BN running mean and variance becomes the mean over ranks; broadcast: rank 0's.
    Other buffers are rank 0's either way."""
    if not dist.distributed:
        return
    reduced = saved_statistics(module, dist, mode)
    for name, buffer in module.named_buffers():
        if name in reduced:
            buffer.copy_(reduced[name])
        else:
            torch.distributed.broadcast(buffer, src=0)


@torch.no_grad()
def saved_statistics(module: nn.Module, dist: DistInfo, mode: str) -> dict[str, torch.Tensor]:
    """The BN running statistics `distribute_bn` would give, as copies: a checkpoint written between
    evaluations saves them (what evaluate.py then measures is what an evaluation here would have) without
    changing each rank's own, which training goes on with. Every rank calls it (collectives)."""
    if not dist.distributed or mode != "reduce":
        return {}  # broadcast: rank 0's own, which rank 0 saves anyway
    reduced = {}
    for name, buffer in module.named_buffers():
        if _bn_statistic(name) and buffer.is_floating_point():
            copy = buffer.detach().clone()
            torch.distributed.all_reduce(copy, op=torch.distributed.ReduceOp.SUM)
            reduced[name] = copy.div_(dist.world_size)
    return reduced


def rank_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """This rank's persistent buffers (BN statistics: each rank's own between evaluations), on the host.
    Not the non-persistent ones (DropBlock's probability): the schedule sets those, and a model built with
    another `dropblock_prob` has other ones."""
    persistent = module.state_dict().keys()
    return {name: buffer.detach().cpu().clone() for name, buffer in module.named_buffers() if name in persistent}


@torch.no_grad()
def load_rank_buffers(module: nn.Module, buffers: dict[str, torch.Tensor]) -> None:
    for name, buffer in module.named_buffers():
        if name in buffers:
            buffer.copy_(buffers[name])


class WeightEma:
    """The exponential moving average of a model's state, in a module of its own (eval mode, no grads)."""

    def __init__(self, model: nn.Module, decay: float, *, warmup: bool, device: torch.device):
        self.decay, self.warmup = decay, warmup
        self.module = copy.deepcopy(model).to(device).eval().requires_grad_(False)
        self._floats = self._integers = None  # (EMA tensors, model tensors), paired once

    def decay_at(self, step: int) -> float:
        """The decay of the update after optimizer step `step` (1-based)."""
        if not self.warmup:
            return self.decay
        return min(self.decay, max(0.0, 1.0 - (1.0 + step) ** -WARMUP_POWER))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """After optimizer step `step`: the floating-point tensors move towards the model's (one fused
        `lerp` over all of them); integer buffers (BN's counters) are copied."""
        if self._floats is None:
            live, ema = model.state_dict(keep_vars=True), self.module.state_dict(keep_vars=True)
            pairs = [(ema[key], value.detach()) for key, value in live.items()]
            self._floats = tuple(map(list, zip(*[p for p in pairs if p[0].is_floating_point()])))
            self._integers = [p for p in pairs if not p[0].is_floating_point()]
        targets, sources = self._floats
        on_device = [m.to(e.device) for e, m in zip(targets, sources)]  # a copy only with train.ema_device=cpu
        torch._foreach_lerp_(targets, on_device, 1.0 - self.decay_at(step))
        for ema_value, value in self._integers:
            ema_value.copy_(value)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)

    def on(self, device: torch.device) -> nn.Module:
        """The EMA module on `device` (a copy when it is kept elsewhere, `train.ema_device=cpu`)."""
        on_device = next(self.module.parameters()).device == device
        return self.module if on_device else copy.deepcopy(self.module).to(device)


def build_ema(model: nn.Module, decay: float, *, warmup: bool, device_setting: str,
              device: torch.device) -> WeightEma | None:
    """The run's weight EMA (`train.ema` > 0), started from the model's current weights."""
    if decay <= 0:
        return None
    return WeightEma(model, decay, warmup=warmup, device=torch.device("cpu") if device_setting == "cpu" else device)
