"""Batch mixup (arXiv 1710.09412) and CutMix (arXiv 1905.04899) with the semantics of timm's `Mixup` in
'batch' mode (`timm/data/mixup.py`), every draw taken from the micro-batch's own generator.

timm's Mixup draws from numpy's global generator, so what a micro-batch gets would depend on what was drawn
before it in that process. Here the caller hands each call the generator of its micro-batch
(`randomness.micro_batch_generator`: (seed, step, micro-batch)), so the draws are the same on any process
count and after a resume. The draws and their order are timm's (`Mixup._params_per_batch`, then
`rand_bbox` for CutMix): whether to mix (`mix_prob`), CutMix instead of mixup when both alphas are set
(`switch_prob`), lambda ~ Beta(alpha, alpha), then the box centre. For the same numpy state the result is
timm's, bit for bit (tests/test_mixing.py), so mixup alone draws the lambdas it drew before.

Each image is mixed with its mirror in the batch (`images.flip(0)`), as timm does. The targets are timm's
`mixup_target`: the label-smoothed one-hot vectors of both images, weighted by lambda, where CutMix's lambda is
the share of the image left unpasted once the box is clipped to the image (timm's `correct_lam=True`).
Unlike timm, the batch is not changed in place: the loader's tensors stay what it delivered.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from timm.data.mixup import mixup_target

Box = tuple[int, int, int, int]  # (top, bottom, left, right): rows top:bottom, columns left:right


@dataclass(frozen=True)
class MixDraw:
    """One micro-batch's draws: `lam` is the weight of each image itself (1.0: not mixed); `box` is the
    region pasted from the mirror image with CutMix (None with mixup or without mixing)."""

    lam: float
    box: Box | None = None


def draw_box(rng: np.random.RandomState, height: int, width: int, lam: float) -> Box:
    """timm's `rand_bbox` (margin 0) from `rng`: a box of sides int(side x sqrt(1 - lam)) centred on a
    uniform pixel, clipped to the image, so its area may fall short of (1 - lam) of the image."""
    ratio = np.sqrt(1 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    centre_y = rng.randint(0, height)
    centre_x = rng.randint(0, width)
    top = int(np.clip(centre_y - cut_h // 2, 0, height))
    bottom = int(np.clip(centre_y + (cut_h + 1) // 2, 0, height))
    left = int(np.clip(centre_x - cut_w // 2, 0, width))
    right = int(np.clip(centre_x + (cut_w + 1) // 2, 0, width))
    return top, bottom, left, right


class BatchMix:
    """`mix(images, targets, rng) -> (mixed images, soft targets)` for one micro-batch (an even number of
    images, the config's check), with timm's Mixup options: `mixup_alpha`, `cutmix_alpha`, `mix_prob`
    (timm's `prob`), `switch_prob`, `label_smoothing`."""

    def __init__(self, *, mixup_alpha: float, cutmix_alpha: float, mix_prob: float, switch_prob: float,
                 label_smoothing: float, num_classes: int):
        assert mixup_alpha > 0 or cutmix_alpha > 0, "build_mixup returns None without mixing"
        self.mixup_alpha = mixup_alpha
        self.cutmix_alpha = cutmix_alpha
        self.mix_prob = mix_prob
        self.switch_prob = switch_prob
        self.label_smoothing = label_smoothing
        self.num_classes = num_classes

    def _lambda(self, rng: np.random.RandomState) -> tuple[float, bool]:
        """timm's `Mixup._params_per_batch`: the same draws in the same order."""
        if not rng.rand() < self.mix_prob:
            return 1.0, False
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            cutmix = bool(rng.rand() < self.switch_prob)
        else:
            cutmix = self.cutmix_alpha > 0
        alpha = self.cutmix_alpha if cutmix else self.mixup_alpha
        return float(rng.beta(alpha, alpha)), cutmix

    def draw(self, rng: np.random.RandomState, height: int, width: int) -> MixDraw:
        """The micro-batch's draws for images of height x width; CutMix's lambda corrected to the clipped
        box's area (timm's `cutmix_bbox_and_lam` with `correct_lam=True`)."""
        lam, cutmix = self._lambda(rng)
        if lam == 1.0 or not cutmix:  # timm's `_mix_batch` leaves a lambda of 1 alone: no box drawn
            return MixDraw(lam)
        box = draw_box(rng, height, width, lam)
        top, bottom, left, right = box
        return MixDraw(1.0 - (bottom - top) * (right - left) / float(height * width), box)

    def __call__(self, images: torch.Tensor, targets: torch.Tensor,
                 rng: np.random.RandomState) -> tuple[torch.Tensor, torch.Tensor]:
        assert len(images) % 2 == 0, "mixing pairs each image with its mirror in the batch"
        draw = self.draw(rng, images.shape[-2], images.shape[-1])
        if draw.box is not None:
            top, bottom, left, right = draw.box
            mixed = images.clone()
            mixed[:, :, top:bottom, left:right] = images[:, :, top:bottom, left:right].flip(0)
        elif draw.lam != 1.0:
            # timm's arithmetic, out of place: x * lam + (flip(x) * (1 - lam)), each product rounded first
            mixed = images.mul(draw.lam).add_(images.flip(0).mul_(1.0 - draw.lam))
        else:
            mixed = images
        return mixed, mixup_target(targets, self.num_classes, draw.lam, self.label_smoothing)
