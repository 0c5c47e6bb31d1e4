"""The training crop's window rules (`data.crop`), drawn by the framework from one image's generator.

Every rule returns [top, left, height, width] in the image's pixels; the backends only cut that window and
resize it to `data.crop_size` (DALI decodes just the window, torchvision's `resized_crop` cuts it), so both
apply the same window to every image.

- `random_resized` (the default): torchvision's `RandomResizedCrop.get_params`, the Inception crop of
  Szegedy et al. (arXiv 1409.4842): ten tries of an area fraction in `data.rrc_scale` and a log-uniform aspect
  ratio in [3/4, 4/3], then the whole image's centre at the nearest allowed ratio.
- `inception`: timm's `RandomResizedCropAndInterpolation` with `interpolation='random'` (timm's train.py
  default, `--train-interpolation random`): its window rule is torchvision's, so the window is the same
  draw; what it adds is the resize's interpolation, drawn per image between bilinear and bicubic (timm's
  `_RANDOM_INTERPOLATION`). Without that draw the two names would be one rule.
- `efficientnet`: the crop of ResNeSt's PyTorch recipe (PyTorch-Encoding's `ERandomCrop`, from
  fast-autoaugment's `EfficientNetRandomCrop`), a port of TensorFlow's `sample_distorted_bounding_box`
  (`GenerateRandomCrop`, sample_distorted_bounding_box_op.cc) as the TPU EfficientNet preprocessing calls it:
  a uniform aspect ratio in [3/4, 4/3], a height between those of the smallest and the largest allowed area,
  up to ten tries, and windows under 10 % of the image refused (`min_object_covered=0.1` against the whole
  image). A window equal to the whole image, or ten failed tries, fall back to `ECenterCrop`: the centred
  square of side crop/(crop + 32) of the shorter side (224/256 = the usual 0.875).
"""

from __future__ import annotations

import math

import numpy as np

RATIO = (3 / 4, 4 / 3)  # every rule's aspect-ratio range (torchvision's, timm's and TensorFlow's default)
CROPS = ("random_resized", "inception", "efficientnet")
INTERPOLATIONS = ("bilinear", "bicubic")  # the `interp` draw's values, timm's _RANDOM_INTERPOLATION order
MIN_COVERED = 0.1  # TF's min_object_covered in EfficientNet's preprocessing and ERandomCrop's min_covered
CENTER_PADDING = 32  # ECenterCrop (and EfficientNet's CROP_PADDING): crop / (crop + 32) of the shorter side
ATTEMPTS = 10


def crop_window(rng: np.random.Generator, height: int, width: int, scale: tuple[float, float]) -> list[int]:
    """torchvision's RandomResizedCrop.get_params with numpy's generator: [top, left, height, width]."""
    area = height * width
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(ATTEMPTS):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return [int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w]
    ratio = width / height  # fallback: the whole image's centre at the nearest allowed ratio
    if ratio < RATIO[0]:
        w, h = width, int(round(width / RATIO[0]))
    elif ratio > RATIO[1]:
        h, w = height, int(round(height * RATIO[1]))
    else:
        w, h = width, height
    return [(height - h) // 2, (width - w) // 2, h, w]


def center_window(height: int, width: int, crop_size: int) -> list[int]:
    """ECenterCrop's window: the centred square of side crop/(crop + 32) of the shorter side, its corners
    rounded as PIL's `Image.crop` rounds a float box (Python's round of each coordinate)."""
    side = crop_size / (crop_size + CENTER_PADDING) * min(height, width)
    top, left = int(round((height - side) / 2)), int(round((width - side) / 2))
    return [top, left, int(round(top + side)) - top, int(round(left + side)) - left]


def efficientnet_window(rng: np.random.Generator, height: int, width: int, min_area: float,
                        crop_size: int) -> list[int]:
    """ERandomCrop's window (area fraction in [min_area, 1], at least MIN_COVERED), or its fallback."""
    area = height * width
    low, high = min_area * area, float(area)
    for _ in range(ATTEMPTS):
        aspect = rng.uniform(*RATIO)  # uniform, not log-uniform: TensorFlow's RandFloat over the range
        h = int(round(math.sqrt(low / aspect)))
        max_h = int(round(math.sqrt(high / aspect)))
        if max_h * aspect > width:
            # the tallest window whose rounded width still fits (GenerateRandomCrop's kEps step)
            max_h = int((width + 0.5 - 1e-7) / aspect)
            if max_h * aspect > width:
                max_h -= 1
        max_h = min(max_h, height)
        h = int(round(rng.uniform(min(h, max_h), max_h)))
        w = int(round(h * aspect))
        if not low <= h * w <= high or w > width or h > height or h * w < MIN_COVERED * area:
            continue
        if h == height and w == width:
            break  # the whole image is no crop: EfficientNet's preprocessing then takes the centre crop
        left = int(rng.integers(0, width - w + 1))  # x before y, as ERandomCrop draws them
        return [int(rng.integers(0, height - h + 1)), left, h, w]
    return center_window(height, width, crop_size)


def draw_crop(rng: np.random.Generator, rule: str, height: int, width: int, *, scale: tuple[float, float],
              min_area: float, crop_size: int) -> dict:
    """The crop's draws for one image under `data.crop` = `rule`: its window, and for `inception` the
    index into INTERPOLATIONS of the resize that follows."""
    if rule == "efficientnet":
        return {"crop": efficientnet_window(rng, height, width, min_area, crop_size)}
    drawn = {"crop": crop_window(rng, height, width, scale)}
    if rule == "inception":
        drawn["interp"] = int(rng.integers(len(INTERPOLATIONS)))  # timm: random.choice of the two
    return drawn
