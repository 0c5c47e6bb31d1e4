"""Stochastic depth (Huang et al., "Deep Networks with Stochastic Depth", arXiv 1603.09382) as timm applies
it to ResNets: each sample's residual branch is dropped with the block's rate and the kept ones are scaled by
1 / (1 - rate) (timm's `layers/drop.py: drop_path`), the rate growing linearly with the block's index over
the whole network (timm's `models/resnet.py: make_blocks`).

The per-sample mask is drawn from torch's global generator, as DropBlock's and dropout's masks are: the
trainer seeds it before each micro-batch's forward pass from (seed, step, micro-batch)
(`resnest_train/randomness.py: seed_micro_batch`), so the masks are the same on any process count.
"""

from __future__ import annotations

import torch
from torch import nn


def drop_path_rates(drop_path_rate: float, num_blocks: int) -> list[float]:
    """Block i's rate, `drop_path_rate * i / (num_blocks - 1)`: 0 for the first block, the full rate for
    the last (timm's "stochastic depth linear decay rule"; a network of one block gets the full rate)."""
    return [drop_path_rate * index / max(num_blocks - 1, 1) for index in range(num_blocks)]


class DropPath(nn.Module):
    """timm's `drop_path` (scale_by_keep=True): identity in eval mode, else x x a per-sample Bernoulli(1 - rate)
    mask / (1 - rate), drawn in x's dtype with `bernoulli_` as timm does, so that for one generator state
    the two agree bit for bit (tests/test_models_drop_path.py)."""

    def __init__(self, rate: float):
        super().__init__()
        if not 0.0 < rate < 1.0:
            raise ValueError(f"drop path rate must be in (0, 1), got {rate}")
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)  # (B, 1, 1, 1)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"rate={self.rate:.4g}"


def make_drop_path(rate: float) -> DropPath | None:
    """A DropPath for a block's rate, or None (no module, no draw) at 0, so a model without stochastic depth
    is the model it was before the option existed."""
    return DropPath(rate) if rate > 0 else None
