"""DropBlock (arXiv 1810.12890) with the mask semantics of the Gluon code that trained the released ResNeSt
weights (zhanghang1989/ResNeSt, `resnest/gluon/dropblock.py`), not torchvision's or timm's.

Gluon's variant differs from torchvision's `drop_block2d` in three ways, all kept here:
- ONE mask of shape (1, C, H, W) is drawn per forward and shared by every sample of the batch;
- seeds are drawn over the full map with probability gamma = p * H*W / bs^2 / ((H - bs + 1) * (W - bs + 1))
  and grown into blocks by a stride-1 max pool padded to keep the size, so border pixels are covered by
  fewer seeds; for p = 0.1 the dropped fraction is about 0.105 / 0.117 / 0.149 at 28 / 14 / 7 px (computed
  from the formula; torchvision's, which only seeds where a whole block fits, drops ~0.097);
- the kept activations are rescaled by one scalar, numel / kept, over the whole (C, H, W) mask.

The probability lives in a 0-d buffer changed in place (`set_prob`), so the trainer's ramp does not change
anything torch.compile guards on: a Python float attribute is a guarded constant and cost one recompilation
per new value (FACTS.md: 9 in one short epoch, then dynamo's limit). The buffer is non-persistent, so the
state-dict keys stay timm's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _block_extent(block_size: int, length: int) -> int:
    """The block shrunk to fit a map side smaller than it, kept odd so the max pool pads symmetrically as
    Gluon's does for its block of 3 (stage 4 of 32-64 px images has 1x1 and 2x2 maps)."""
    extent = min(block_size, length)
    return extent - (1 - extent % 2)


def drop_block_multiplier(uniform: torch.Tensor, prob: torch.Tensor | float, block_size: int) -> torch.Tensor:
    """(1, C, H, W) uniform draws in [0, 1) -> (1, C, H, W) multiplier: keep mask * numel / kept count.

    Separate from the module so a test can feed it known draws and compare with Gluon's formula."""
    _, _, height, width = uniform.shape
    block_h, block_w = _block_extent(block_size, height), _block_extent(block_size, width)
    # Gluon's seed rate: p scaled by the map area over the block area and the number of valid positions.
    gamma = prob * (height * width) / (block_h * block_w) / ((height - block_h + 1) * (width - block_w + 1))
    seeds = (uniform < gamma).to(uniform.dtype)
    dropped = F.max_pool2d(seeds, (block_h, block_w), stride=1, padding=(block_h // 2, block_w // 2))
    keep = 1.0 - dropped
    # One scalar over the whole mask, as Gluon's `numel / mask.sum()`; the clamp guards the (improbable)
    # all-dropped mask, where Gluon would divide by zero.
    return keep * (keep.numel() / keep.sum().clamp(min=1.0))


class DropBlock2d(nn.Module):
    """Gluon-style DropBlock: identity in eval mode and at probability 0, one mask shared by the batch."""

    def __init__(self, prob: float = 0.0, *, block_size: int = 3):
        super().__init__()
        self.block_size = block_size
        self.register_buffer("drop_prob", torch.tensor(float(prob)), persistent=False)

    def set_prob(self, prob: float) -> None:
        """In place, so a compiled graph reads the new value without recompiling."""
        with torch.no_grad():
            self.drop_prob.fill_(prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        # No `if prob == 0` shortcut: branching on the tensor's value would break the compiled graph; at
        # probability 0 no seed is drawn and the multiplier is exactly 1.
        uniform = torch.rand((1, *x.shape[1:]), device=x.device, dtype=torch.float32)
        multiplier = drop_block_multiplier(uniform, self.drop_prob.float(), self.block_size)
        # Cast the small mask, not the activation: the block keeps its compute dtype under autocast.
        return x * multiplier.to(x.dtype)

    def extra_repr(self) -> str:
        return f"block_size={self.block_size}"  # not the probability: reading it would sync a GPU


def make_drop_block(prob: float) -> nn.Module:
    """DropBlock with the reference's block of 3, or an identity when the model is built without it."""
    return DropBlock2d(prob, block_size=3) if prob > 0 else nn.Identity()
