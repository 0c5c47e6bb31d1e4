"""AutoAugment's ImageNet policy (arXiv 1805.09501) as the Gluon ResNeSt run trained it: the table, the
magnitude of every level and the PIL ops, defined once for every backend (`dali_autoaugment` builds the DALI
graph's policy from the same table and `magnitude`; its ops are tested to give the images these PIL ops give).

Where each definition comes from. The released ResNeSt weights were trained with `scripts/gluon/train.py
--auto_aug` of zhanghang1989/ResNeSt, which applies `AugmentationBlock(autoaug_imagenet_policies())` from
`resnest/gluon/data_utils.py` with the ops and the level-to-magnitude mapping of `resnest/gluon/transforms.py`
(adapted there from kakaobrain/fast-autoaugment; both files unchanged since commit eec8960):
- Levels run 0..10 (`PARAMETER_MAX = 10`): a level is a tenth of the op's range, so rotate 9 is 27 degrees,
  not 30 (`float_parameter(level, max) = level * max / 10`, `int_parameter` truncates it).
- shear_x/shear_y: 0.3 * level / 10, PIL affine (1, m, 0 | 0, 1, 0): output (x, y) samples the input at
  (x + m * y, y), a shear about the top-left corner. rotate: int(30 * level / 10) degrees, counter-clockwise
  about the centre (`Image.rotate`). Both take a random sign (`random_mirror`: negated when random() > 0.5).
- solarize: threshold 256 - int(25.6 * level) (pixels >= threshold inverted); posterize (Gluon's `Posterize2`):
  keeps 4 - int(0.4 * level) bits; color/contrast/brightness/sharpness: factor 0.1 + 0.18 * level
  (`float_parameter(level, 1.8) + .1`), no sign; auto_contrast/equalize/invert ignore the level.
- Each op of the drawn sub-policy runs with its own probability (`if random.random() > pr: continue`), the
  sub-policy is drawn uniformly per image. Gluon ran it on the decoded image, before the random-resized crop
  (`get_train_data`); `data.autoaugment_on` chooses that order (`image`) or the crop (`crop`).
- No sub-policy of the table translates, so translate has no Gluon level (its mapping there would fail its
  own range assert). translate_x/translate_y and solarize_add are RandAugment's ops (`randaugment.py`), written
  after timm's `translate_x_abs`/`translate_y_abs` (PIL affine (1, 0, px | 0, 1, 0): output x samples input
  x + px) and `solarize_add` (values below 128 raised by the argument, capped at 255); they take no level.
Deviations, each forced or chosen so that every backend computes the same image:
- Table: the paper's, as torchvision's `AutoAugmentPolicy.IMAGENET` and timm's `original`. Gluon's table
  differs in one entry, sub-policy 15 (Rotate 0.8 8, Color 1.0 **0** instead of 2): `GLUON_POLICY`.
- Warps: nearest neighbour, fill 0. Gluon's rotate is nearest with PIL's default fill 0 (black), but its
  shear is bicubic; DALI's `warp_affine` only has nearest and linear ("Only nearest and linear interpolation
  is supported"), so shear is nearest everywhere, torchvision's AutoAugment default.
- Equalize: DALI's formula, round(255 * (cdf - cdf[min]) / (N - cdf[min])) per channel (its GPU kernel's, in
  float64; the CPU kernel is OpenCV's), here in numpy. PIL's (Gluon's) divides the cdf below the value by
  (N - count of the top value) // 255: a mean 1.9 and 3.9 grey levels apart on two photographs, and DALI has
  no histogram op to compute PIL's on the GPU.
The PIL ops are the torchvision backend's transform (`AutoAugment`, torch's RNG, which DataLoader seeds per
worker) and the DALI CPU graph's host op (`dali_cpu.HostAutoAugment`, with the framework's draws: draws.py).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

# Levels 0..10 inclusive: Gluon's PARAMETER_MAX = 10; DALI's magnitude bins are the levels themselves.
NUM_LEVELS = 11
FILL = (0, 0, 0)  # PIL's default fill of Gluon's Rotate/ShearX: black
SIGNED_OPS = frozenset({"shear_x", "shear_y", "rotate"})

# The paper's ImageNet policy (arXiv 1805.09501; torchvision's IMAGENET and timm's "original" tables):
# (op, probability, level) per stage.
IMAGENET_POLICY = (
    (("posterize", 0.4, 8), ("rotate", 0.6, 9)),
    (("solarize", 0.6, 5), ("auto_contrast", 0.6, 5)),
    (("equalize", 0.8, 8), ("equalize", 0.6, 3)),
    (("posterize", 0.6, 7), ("posterize", 0.6, 6)),
    (("equalize", 0.4, 7), ("solarize", 0.2, 4)),
    (("equalize", 0.4, 4), ("rotate", 0.8, 8)),
    (("solarize", 0.6, 3), ("equalize", 0.6, 7)),
    (("posterize", 0.8, 5), ("equalize", 1.0, 2)),
    (("rotate", 0.2, 3), ("solarize", 0.6, 8)),
    (("equalize", 0.6, 8), ("posterize", 0.4, 6)),
    (("rotate", 0.8, 8), ("color", 0.4, 0)),
    (("rotate", 0.4, 9), ("equalize", 0.6, 2)),
    (("equalize", 0.0, 7), ("equalize", 0.8, 8)),
    (("invert", 0.6, 4), ("equalize", 1.0, 8)),
    (("color", 0.6, 4), ("contrast", 1.0, 8)),
    (("rotate", 0.8, 8), ("color", 1.0, 2)),
    (("color", 0.8, 8), ("solarize", 0.8, 7)),
    (("sharpness", 0.4, 7), ("invert", 0.6, 8)),
    (("shear_x", 0.6, 5), ("equalize", 1.0, 9)),
    (("color", 0.4, 0), ("equalize", 0.6, 3)),
    (("equalize", 0.4, 7), ("solarize", 0.2, 4)),
    (("solarize", 0.6, 5), ("auto_contrast", 0.6, 5)),
    (("invert", 0.6, 4), ("equalize", 1.0, 8)),
    (("color", 0.6, 4), ("contrast", 1.0, 8)),
    (("equalize", 0.8, 8), ("equalize", 0.6, 3)),
)
# resnest/gluon/data_utils.py `autoaug_imagenet_policies`: the paper's table but Color level 0 in sub-policy 15.
GLUON_POLICY = IMAGENET_POLICY[:15] + ((("rotate", 0.8, 8), ("color", 1.0, 0)),) + IMAGENET_POLICY[16:]
POLICIES = {"imagenet": IMAGENET_POLICY, "gluon": GLUON_POLICY}


def _tenths(level: int, maximum: float) -> float:
    return float(level) * maximum / 10  # Gluon's float_parameter (PARAMETER_MAX = 10)


_MAGNITUDES = {
    "shear_x": lambda level: _tenths(level, 0.3),
    "shear_y": lambda level: _tenths(level, 0.3),
    "rotate": lambda level: int(_tenths(level, 30)),
    "solarize": lambda level: 256 - int(_tenths(level, 256)),
    "posterize": lambda level: 4 - int(_tenths(level, 4)),
    "color": lambda level: _tenths(level, 1.8) + 0.1,
    "contrast": lambda level: _tenths(level, 1.8) + 0.1,
    "brightness": lambda level: _tenths(level, 1.8) + 0.1,
    "sharpness": lambda level: _tenths(level, 1.8) + 0.1,
    "auto_contrast": lambda level: 0,
    "equalize": lambda level: 0,
    "invert": lambda level: 0,
}
OPS = tuple(_MAGNITUDES)


def magnitude(op: str, level: int) -> float | int:
    """Gluon's magnitude of `op` at `level` (0..10): shear in PIL affine units, rotate in degrees, solarize's
    threshold, posterize's bits kept, the enhance factor; 0 for the ops without one. Unsigned."""
    if op not in _MAGNITUDES:
        raise ValueError(f"unknown AutoAugment op {op!r}; known: {', '.join(OPS)}")
    if not 0 <= level < NUM_LEVELS:
        raise ValueError(f"AutoAugment level {level} of {op!r} outside 0..{NUM_LEVELS - 1}")
    return _MAGNITUDES[op](level)


def equalize_lut(channel: np.ndarray) -> np.ndarray:
    """DALI's `fn.equalize` lookup table (OpenCV's equalizeHist) for one uint8 channel: the cumulative count,
    less that of the lowest value present, scaled to 0..255 and rounded (half to even, as both round)."""
    hist = np.bincount(channel.ravel(), minlength=256)
    first = hist[np.flatnonzero(hist)[0]]
    if first == channel.size:  # one value only: DALI keeps it
        return np.arange(256, dtype=np.uint8)
    lut = np.rint((np.cumsum(hist) - first) * (255.0 / (channel.size - first)))
    return np.clip(lut, 0, 255).astype(np.uint8)


def _equalize(image: Image.Image) -> Image.Image:
    pixels = np.asarray(image)
    return image.point(np.concatenate([equalize_lut(pixels[..., c]) for c in range(3)]).tolist())


def posterize_mask(bits: int) -> int:
    """The mask that keeps the top `bits` bits (0 bits, Gluon's level 10: black; Pillow >= 10 refuses 0)."""
    return 0xFF ^ (2 ** (8 - bits) - 1)


def _affine(image: Image.Image, coefficients) -> Image.Image:
    return image.transform(image.size, Image.AFFINE, coefficients, Image.NEAREST, fillcolor=FILL)


_PIL_OPS = {
    "shear_x": lambda im, m: _affine(im, (1, m, 0, 0, 1, 0)),
    "shear_y": lambda im, m: _affine(im, (1, 0, 0, m, 1, 0)),
    "rotate": lambda im, m: im.rotate(m, Image.NEAREST, fillcolor=FILL),
    "solarize": lambda im, m: ImageOps.solarize(im, m),
    "posterize": lambda im, m: im.point([value & posterize_mask(m) for value in range(256)] * 3),
    "color": lambda im, m: ImageEnhance.Color(im).enhance(m),
    "contrast": lambda im, m: ImageEnhance.Contrast(im).enhance(m),
    "brightness": lambda im, m: ImageEnhance.Brightness(im).enhance(m),
    "sharpness": lambda im, m: ImageEnhance.Sharpness(im).enhance(m),
    "auto_contrast": lambda im, m: ImageOps.autocontrast(im),
    "equalize": lambda im, m: _equalize(im),
    "invert": lambda im, m: ImageOps.invert(im),
    # RandAugment's (timm's auto_augment.py), warped as the ops above: nearest neighbour, fill 0
    "translate_x": lambda im, m: _affine(im, (1, 0, m, 0, 1, 0)),
    "translate_y": lambda im, m: _affine(im, (1, 0, 0, 0, 1, m)),
    "solarize_add": lambda im, m: im.point([min(255, v + m) if v < 128 else v for v in range(256)] * 3),
}


def apply_op(image: Image.Image, op: str, magnitude: float | int) -> Image.Image:
    """`op` at a (signed) magnitude, as `magnitude()` (AutoAugment) or `randaugment.op_arg` gives it, on an RGB
    PIL image."""
    return _PIL_OPS[op](image, magnitude)


def resolve(policy) -> list[list[tuple[str, float, float | int, bool]]]:
    """Per sub-policy and stage: (op, probability, magnitude, signed), magnitudes looked up once."""
    return [[(op, prob, magnitude(op, level), op in SIGNED_OPS) for op, prob, level in sub] for sub in policy]


def apply_sub_policy(image: Image.Image, steps, run, negate) -> Image.Image:
    """Stage k of a resolved sub-policy runs when run[k] < its probability (DALI's and torchvision's test),
    negated when negate[k] and the op takes a sign."""
    for stage, (op, prob, mag, signed) in enumerate(steps):
        if run[stage] < prob:
            image = apply_op(image, op, -mag if signed and negate[stage] else mag)
    return image


class AutoAugment:
    """The torchvision backend's transform: RGB PIL image in and out. Draws from torch's RNG, which the
    DataLoader seeds per worker (Python's `random` is seeded too, but the sampler and the other transforms
    already draw from torch)."""

    def __init__(self, policy=IMAGENET_POLICY):
        self.sub_policies = resolve(policy)
        self.stages = max(len(sub) for sub in self.sub_policies)

    def draw(self) -> tuple[int, list[float], list[bool]]:
        """What DALI's `apply_auto_augment` draws: a sub-policy, a uniform per stage, a sign per stage."""
        index = int(torch.randint(len(self.sub_policies), ()))
        return index, torch.rand(self.stages).tolist(), torch.randint(2, (self.stages,)).bool().tolist()

    def __call__(self, image: Image.Image) -> Image.Image:
        index, run, negate = self.draw()
        return apply_sub_policy(image, self.sub_policies[index], run, negate)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self.sub_policies)} sub-policies)"
