"""RandAugment (arXiv 1909.13719) as timm 1.0.31 defines it, with every random choice drawn by the framework
per image (draws.py) and applied by either backend: the PIL ops of `autoaugment.py` (one definition per op
for AutoAugment and RandAugment; torchvision backend, DALI's CPU graph) or their DALI versions
(`dali_randaugment.py`, DALI's GPU graph).

`data.autoaugment` takes timm's string (`timm/data/auto_augment.py`, `rand_augment_transform`): `rand`, then
dash-separated parts in any order, `m` magnitude (int, default 10), `n` ops per image (int, 2), `p` each op's
probability (0.5), `mstd` the magnitude's noise (0; above 100: uniform), `mmax` its upper bound (10), `inc1`
the "increasing" table; e.g. `rand-m9-n2-mstd0.5`, `rand-m6-mstd0.5-inc1`.
What timm does per image, and what is drawn here instead (`draw`, from the image's generator, a fixed sequence
whatever runs):
- `RandAugment.__call__`: n ops uniformly with replacement (`np.random.choice(ops, n, replace=True)`) from
  `_RAND_TRANSFORMS` (`_RAND_INCREASING_TRANSFORMS` with inc1) -> `op`, n table indices.
- `AugmentOp.__call__`: an op is skipped when `random.random() > prob` -> `run`, n uniforms; the op runs when
  its uniform is below p (timm: not above p; they differ only on u == p, of probability 0).
- the magnitude: m, or `random.gauss(m, mstd)`, or `random.uniform(0, m)` when mstd is inf, clipped to
  [0, mmax or `_LEVEL_DENOM` = 10]; a float, not rounded to a level -> `magnitude`, n float32 values.
- `LEVEL_TO_ARG` maps it to the op's argument; rotate, shear, translate and the *Increasing enhance ops
  negate (theirs or the deviation from 1) when `random.random() > 0.5` (`_randomly_negate`) -> `negate`, n
  bits, drawn for every op (unsigned ops ignore theirs).
timm draws the magnitude and the sign only for an op that runs; drawing them always changes nothing in their
distribution and keeps the record one shape. `op_args` turns them into each layer's argument (`arg`: degrees,
shear, pixels, threshold, bits, enhance factor), which both backends apply as the same float32 value.

Where the ops differ from timm's, each so that the DALI graph and PIL compute the same image:
- warps (rotate, shear, translate) are nearest neighbour with fill 0 (autoaugment.py's AutoAugment ops),
  where timm resamples bilinear or bicubic (`_RANDOM_INTERPOLATION`, or the transform's interpolation) and
  fills with `img_mean` (128, or the dataset mean through `create_transform`): DALI's `warp_affine` has
  nearest and linear filters only, and one definition per op serves AutoAugment too.
- equalize is DALI's formula (`autoaugment.equalize_lut`), not PIL's `ImageOps.equalize` (DALI has no op for
  PIL's).
- posterize to 0 bits makes the image black (the AND mask DALI applies, and Pillow < 10's `ImageOps.posterize`);
  Pillow >= 10 refuses 0 bits, so timm's op raises there (Posterize below magnitude 2.5, PosterizeIncreasing
  at 10, which `mstd` noise clipped at 10 reaches). Bits are clamped to 0..8: timm's argument leaves that
  range when mmax > 10, where Pillow < 10 gave black (negative bits) or the image (timm's guard, >= 8).
- `t` (a weighted choice without replacement) is not supported.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

from resnest_train.data.autoaugment import apply_op

LEVEL_DENOM = 10.0  # timm's _LEVEL_DENOM: magnitude 10 is an op's full range, and the default upper bound
MAX_LAYERS = 10  # each layer is one more n-way branch in the DALI graph; timm's presets use 2 or 3
UNIFORM_STD = 100.0  # timm: "uniform sampling in 0 to magnitude if mstd is > 100"

# timm's _RAND_TRANSFORMS and _RAND_INCREASING_TRANSFORMS, in their order (the drawn index is into these)
RAND_TRANSFORMS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
                   "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
RAND_INCREASING_TRANSFORMS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
                              "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
                              "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
                              "TranslateYRel")


def _tenths(level: float) -> float:
    return level / LEVEL_DENOM


def _enhance_increasing(level: float, sign: float) -> float:
    # timm's _enhance_increasing_level_to_arg: 1 +- 0.9 level / 10, kept >= 0.1
    return max(0.1, 1.0 + sign * (_tenths(level) * .9))


def _posterize(bits: int) -> int:
    return min(8, max(0, bits))  # the images timm's op made outside 0..8 with Pillow < 10 (module docstring)


# timm name -> (the op of autoaugment.py, its LEVEL_TO_ARG entry as f(level, sign)); each expression is
# timm's, in its order of operations, so the arguments are its floats bit for bit.
LEVEL_TO_ARG = {
    "AutoContrast": ("auto_contrast", None),
    "Equalize": ("equalize", None),
    "Invert": ("invert", None),
    "Rotate": ("rotate", lambda level, sign: sign * (_tenths(level) * 30.)),
    "Posterize": ("posterize", lambda level, sign: _posterize(int(_tenths(level) * 4))),
    "PosterizeIncreasing": ("posterize", lambda level, sign: _posterize(4 - int(_tenths(level) * 4))),
    "Solarize": ("solarize", lambda level, sign: min(256, int(_tenths(level) * 256))),
    "SolarizeIncreasing": ("solarize", lambda level, sign: 256 - min(256, int(_tenths(level) * 256))),
    "SolarizeAdd": ("solarize_add", lambda level, sign: min(128, int(_tenths(level) * 110))),
    "Color": ("color", lambda level, sign: _tenths(level) * 1.8 + 0.1),
    "ColorIncreasing": ("color", _enhance_increasing),
    "Contrast": ("contrast", lambda level, sign: _tenths(level) * 1.8 + 0.1),
    "ContrastIncreasing": ("contrast", _enhance_increasing),
    "Brightness": ("brightness", lambda level, sign: _tenths(level) * 1.8 + 0.1),
    "BrightnessIncreasing": ("brightness", _enhance_increasing),
    "Sharpness": ("sharpness", lambda level, sign: _tenths(level) * 1.8 + 0.1),
    "SharpnessIncreasing": ("sharpness", _enhance_increasing),
    "ShearX": ("shear_x", lambda level, sign: sign * (_tenths(level) * 0.3)),
    "ShearY": ("shear_y", lambda level, sign: sign * (_tenths(level) * 0.3)),
    # timm's _translate_rel_level_to_arg (translate_pct 0.45); op_args scales it by the image's width/height
    "TranslateXRel": ("translate_x", lambda level, sign: sign * (_tenths(level) * 0.45)),
    "TranslateYRel": ("translate_y", lambda level, sign: sign * (_tenths(level) * 0.45)),
}
INTEGER_OPS = frozenset({"posterize", "solarize", "solarize_add"})  # their PIL ops take ints


@dataclass(frozen=True)
class RandAugmentSpec:
    """A parsed `rand-...` string: timm's `rand_augment_transform` defaults where a part is absent."""

    magnitude: int = 10
    num_layers: int = 2
    prob: float = 0.5
    magnitude_std: float = 0.0  # math.inf: uniform in [0, magnitude]
    magnitude_max: int = 0  # 0: timm's default bound, LEVEL_DENOM (`magnitude_max or _LEVEL_DENOM`)
    increasing: bool = False

    @property
    def transforms(self) -> tuple[str, ...]:
        return RAND_INCREASING_TRANSFORMS if self.increasing else RAND_TRANSFORMS

    @property
    def ops(self) -> tuple[str, ...]:
        """The op of autoaugment.py behind each entry of the table."""
        return tuple(LEVEL_TO_ARG[name][0] for name in self.transforms)

    @property
    def upper(self) -> float:
        return float(self.magnitude_max or LEVEL_DENOM)


# part -> (field, type, what it takes)
_PARTS = {"m": ("magnitude", int, "an integer"), "n": ("num_layers", int, "an integer"),
          "p": ("prob", float, "a number"), "mstd": ("magnitude_std", float, "a number"),
          "mmax": ("magnitude_max", int, "an integer"), "inc": ("increasing", int, "0 or 1")}
_SYNTAX = "rand[-m<int>][-n<int>][-p<float>][-mstd<float>][-mmax<int>][-inc<0|1>]"


def is_rand_augment(name: str) -> bool:
    return name == "rand" or name.startswith("rand-")


def _part(part: str, text: str) -> tuple[str, str, int | float]:
    # timm splits a part at its first digit (`re.split(r'(\d.*)', c)`): the key before it, the value after
    match = re.fullmatch(r"([a-z]*)(\d.*)", part)
    if part.startswith("t"):
        raise ValueError(f"part {part!r} of {text!r}: timm's weighted op choice (t<name>) is not supported")
    if match is None or match.group(1) not in _PARTS:
        raise ValueError(f"unknown part {part!r} in {text!r} (expected {_SYNTAX})")
    key, value = match.groups()
    field, kind, takes = _PARTS[key]
    try:
        number = kind(value)
    except ValueError:
        raise ValueError(f"part {part!r} of {text!r}: {key} takes {takes}, got {value!r}") from None
    if (key == "inc" and number not in (0, 1)) or (key == "p" and not 0.0 <= number <= 1.0) \
            or (key == "n" and not 1 <= number <= MAX_LAYERS):
        limits = {"inc": "0 or 1", "p": "in [0, 1]", "n": f"in 1..{MAX_LAYERS}"}[key]
        raise ValueError(f"part {part!r} of {text!r}: {key} must be {limits}, got {value}")
    return key, field, number


@functools.lru_cache(maxsize=16)
def parse_rand_augment(text: str) -> RandAugmentSpec:
    """timm's RandAugment string as a spec; a ValueError naming the part that is not one."""
    head, *parts = text.split("-")
    if head != "rand":
        raise ValueError(f"a RandAugment string is {_SYNTAX}, got {text!r}")
    values: dict = {}
    for part in parts:
        key, field, number = _part(part, text)
        if field in values:
            raise ValueError(f"part {part!r} of {text!r} sets {key} a second time")
        values[field] = number
    if values.get("magnitude_std", 0.0) > UNIFORM_STD:
        values["magnitude_std"] = math.inf
    return RandAugmentSpec(**{**values, "increasing": bool(values.get("increasing", 0))})


def draw(rng: np.random.Generator, spec: RandAugmentSpec) -> dict[str, np.ndarray]:
    """One image's RandAugment draws from its generator, in this order (the order is the format)."""
    n = spec.num_layers
    op = rng.integers(0, len(spec.transforms), n)
    run = rng.random(n)
    if math.isinf(spec.magnitude_std):
        level = rng.uniform(0.0, spec.magnitude, n)
    else:
        level = spec.magnitude + spec.magnitude_std * rng.standard_normal(n)
    magnitude = np.clip(level, 0.0, spec.upper).astype(np.float32)
    return {"op": op, "run": run, "magnitude": magnitude, "negate": rng.integers(0, 2, n)}


def op_arg(name: str, magnitude: float, negate: bool, height: int, width: int) -> float:
    """timm's argument of op `name` (of its table) at `magnitude` on an image of that size: degrees, shear,
    pixels (timm's translate_x_rel: pct * img.size[0]), threshold, bits, enhance factor; 0 without one."""
    op, level_to_arg = LEVEL_TO_ARG[name]
    if level_to_arg is None:
        return 0.0
    arg = level_to_arg(float(magnitude), -1.0 if negate else 1.0)
    return arg * width if op == "translate_x" else arg * height if op == "translate_y" else arg


def op_args(spec: RandAugmentSpec, op, magnitude, negate, height: int, width: int) -> np.ndarray:
    """Each layer's argument, as the float32 both backends apply (`height`, `width`: the image RandAugment
    sees, the decoded one or the crop)."""
    return np.array([op_arg(spec.transforms[int(index)], mag, bool(sign), height, width)
                     for index, mag, sign in zip(op, magnitude, negate)], dtype=np.float32)


def apply_rand_augment(image: Image.Image, spec: RandAugmentSpec, op, run, arg) -> Image.Image:
    """Layer k applies table entry op[k] with argument arg[k] when run[k] < p (the PIL side: torchvision
    backend and DALI's CPU graph)."""
    for layer in range(spec.num_layers):
        if run[layer] < spec.prob:
            name = spec.ops[int(op[layer])]
            value = int(arg[layer]) if name in INTEGER_OPS else float(arg[layer])
            image = apply_op(image, name, value)
    return image
