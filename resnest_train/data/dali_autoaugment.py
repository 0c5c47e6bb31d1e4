"""The AutoAugment policy of `autoaugment` (table, levels, Gluon's magnitudes) as an `nvidia.dali.auto_aug`
Policy, for DALI's GPU graph: each op written with DALI operators so that it gives the image the PIL op gives
(tests/test_autoaugment.py runs both on the CPU).

DALI's magnitude bins are the levels (11 bins, bin k = level k) and every augmentation's magnitudes are the
explicit array `magnitude(op, 0..10)`, so no linspace stands between the table and the parameter; the sign of
shear and rotate is DALI's random negation. DALI's suite (`nvidia.dali.auto_aug.augmentations`) is close but
not PIL's: its enhance ops round where PIL's `Image.blend` truncates in float32, its contrast centre is a
float mean where PIL's is the rounded mean of the L image, its sharpness filters the 1-pixel border that PIL
leaves as is, its auto-contrast rounds where PIL truncates in float64, its shear maps input to output where
PIL's affine coefficients map output to input. Those ops are written here after PIL's arithmetic (Pillow's
ImageEnhance, Blend.c, Filter.c, ImageOps.autocontrast). Equalize is DALI's own, whose formula the PIL side
copies (`autoaugment.equalize_lut`). RandAugment's graph (`dali_randaugment.py`) calls the same functions
(`dali_op`), with translate and solarize_add besides.
"""

from __future__ import annotations

import warnings

import numpy as np
from nvidia.dali import fn, types
from nvidia.dali import math as dali_math
from nvidia.dali.auto_aug import augmentations, auto_augment
from nvidia.dali.auto_aug.core import Policy, augmentation, signed_bin
from nvidia.dali.auto_aug.core._utils import pretty_select

from resnest_train.data.autoaugment import FILL, NUM_LEVELS, OPS, POLICIES, SIGNED_OPS, magnitude, posterize_mask

_SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32)  # PIL's ImageFilter.SMOOTH, divisor 13


def _blend(degenerate, images, factor):
    """PIL's Image.blend(degenerate, image, factor): degenerate + factor * (image - degenerate) in float32,
    truncated and clipped (Blend.c)."""
    mixed = degenerate + factor * (fn.cast(images, dtype=types.FLOAT) - degenerate)
    return fn.cast(dali_math.clamp(dali_math.floor(mixed), 0, 255), dtype=types.UINT8)


def _luma(images):
    """PIL's RGB -> L, exactly: (19595 R + 38470 G + 7471 B + 2^15) >> 16. (H, W, 3) -> (H, W, 1) int32."""
    rgb = fn.cast(images, dtype=types.INT32)
    return (rgb[:, :, 0:1] * 19595 + rgb[:, :, 1:2] * 38470 + rgb[:, :, 2:3] * 7471 + 32768) // 65536


def _shear(images, shear):
    # inverse_map: PIL's affine coefficients map output pixels to input pixels.
    return fn.warp_affine(images, matrix=fn.transforms.shear(shear=shear), fill_value=FILL[0],
                          interp_type=types.INTERP_NN, inverse_map=True)


def _translate(images, offset):
    # inverse_map, as _shear: PIL's (1, 0, px | 0, 1, py) samples the input at output + (px, py).
    return fn.warp_affine(images, matrix=fn.transforms.translation(offset=offset), fill_value=FILL[0],
                          interp_type=types.INTERP_NN, inverse_map=True)


def _rotate(images, angle):
    return fn.rotate(images, angle=angle, fill_value=FILL[0], interp_type=types.INTERP_NN, keep_size=True)


def _color(images, factor):
    return _blend(fn.cast(_luma(images), dtype=types.FLOAT), images, factor)


def _contrast(images, factor):
    # PIL's centre, int(mean of the L image + 0.5), in integers: a float32 mean of a 224 px image can round
    # the other way.
    luma = _luma(images)
    total = fn.reductions.sum(luma, dtype=types.INT64)
    height_width = luma.shape(dtype=types.INT64)  # metadata, read on the CPU whatever the images' device
    count = height_width[0] * height_width[1]
    centre = (2 * total + count) // (2 * count)
    return _blend(fn.cast(centre, dtype=types.FLOAT), images, factor)


def _brightness(images, factor):
    return _blend(0.0, images, factor)


def _sharpness(images, factor):
    """PIL's Sharpness: blend with SMOOTH (3x3 sum, rounded division by 13); PIL leaves the 1-pixel border
    of the smoothed image unfiltered, so the border keeps its pixels."""
    kernel = types.Constant(_SMOOTH, device=images.device)
    smooth = dali_math.floor((fn.filter(images, kernel, border="clamp", dtype=types.FLOAT) + 6) / 13)
    # All ones, on the images' device: DALI 2.4 implements `ones_like` on the CPU only (its operator
    # registry: `gpu_ops()` has no OnesLike), and a GPU graph with it fails to build.
    ones = fn.cast(images >= 0, dtype=types.UINT8)
    interior = fn.filter(ones, kernel, border="constant", dtype=types.FLOAT) == 13  # full 3x3 window
    keep = fn.cast(interior, dtype=types.UINT8)
    return fn.cast(_blend(smooth, images, factor) * keep + images * (1 - keep), dtype=types.UINT8)


def _auto_contrast(images, _):
    """PIL's autocontrast: per channel int(x * scale + offset), scale = 255 / (max - min), in float64."""
    low = fn.cast(fn.reductions.min(images, axis_names="HW", keep_dims=True), dtype=types.FLOAT64)
    high = fn.cast(fn.reductions.max(images, axis_names="HW", keep_dims=True), dtype=types.FLOAT64)
    scale = types.Constant(255.0, dtype=types.FLOAT64) / dali_math.max(high - low, 1.0)
    stretched = dali_math.floor(fn.cast(images, dtype=types.FLOAT64) * scale + (-low * scale))
    keep = fn.cast(high > low, dtype=types.UINT8)  # a flat channel stays as it is
    return fn.cast(fn.cast(stretched, dtype=types.UINT8) * keep + images * (1 - keep), dtype=types.UINT8)


def _equalize(images, _):
    return fn.equalize(images)


# op -> (DALI function, mag_to_param, param_device); the warps take their parameters as CPU arguments, the
# point ops as tensors on the images' device.
_DALI_OPS = {
    "shear_x": (_shear, lambda m: np.array([m, 0], np.float32), "cpu"),
    "shear_y": (_shear, lambda m: np.array([0, m], np.float32), "cpu"),
    "rotate": (_rotate, np.float32, "cpu"),
    "solarize": (augmentations.solarize.op, np.int32, "auto"),  # x < threshold kept, else 255 - x: PIL's
    "posterize": (augmentations.posterize.op, lambda bits: np.uint8(posterize_mask(int(bits))), "auto"),
    "color": (_color, np.float32, "auto"),
    "contrast": (_contrast, np.float32, "auto"),
    "brightness": (_brightness, np.float32, "auto"),
    "sharpness": (_sharpness, np.float32, "auto"),
    "auto_contrast": (_auto_contrast, None, None),
    "equalize": (_equalize, None, None),
    "invert": (augmentations.invert.op, None, None),
    # RandAugment's (autoaugment.py): no Gluon level, so no Augmentation below; dali_randaugment calls them
    "translate_x": (_translate, None, None),
    "translate_y": (_translate, None, None),
    "solarize_add": (augmentations.solarize_add.op, None, None),  # x < 128: x + shift (uint8, <= 255), PIL's
}


def dali_op(op: str):
    """The DALI function of `op` (autoaugment.py's name), called as `function(images, parameter)`."""
    return _DALI_OPS[op][0]


def _augmentation(op: str):
    function, mag_to_param, param_device = _DALI_OPS[op]
    if mag_to_param is None:
        return augmentation(function, name=op)
    levels = np.array([magnitude(op, level) for level in range(NUM_LEVELS)])
    return augmentation(function, mag_range=levels, randomly_negate=op in SIGNED_OPS, mag_to_param=mag_to_param,
                        param_device=param_device, name=op)


AUGMENTATIONS = {op: _augmentation(op) for op in OPS}  # the ops with Gluon's levels


def dali_policy(policy_name: str = "imagenet") -> Policy:
    """The table `autoaugment.POLICIES[policy_name]` ("imagenet": the paper's; "gluon") as a DALI Policy."""
    if policy_name not in POLICIES:
        raise ValueError(f"unknown AutoAugment policy {policy_name!r}; known: {', '.join(POLICIES)}")
    sub_policies = [[(AUGMENTATIONS[op], prob, level if AUGMENTATIONS[op].mag_range is not None else None)
                     for op, prob, level in sub] for sub in POLICIES[policy_name]]
    with warnings.catch_warnings():
        # The paper's sub-policy 12 runs equalize with probability 0.0 (kept: the table is the paper's).
        warnings.filterwarnings("ignore", message=".*used with probability 0", category=UserWarning)
        return Policy(policy_name, num_magnitude_bins=NUM_LEVELS, sub_policies=sub_policies)


def dali_auto_augment(images, sub_policy, run, negate, *, policy_name: str = "imagenet"):
    """AutoAugment on a batch of HWC uint8 images inside a pipeline built with `enable_conditionals=True`,
    with the framework's draws (draws.py) per image: the sub-policy index, a uniform per stage (the stage
    runs when it is below the stage's probability) and a sign per stage. DALI's `apply_auto_augment` with
    those in place of its own `fn.random` draws (no op of the tables depends on the image size, so full
    images and crops take the same call)."""
    policy = dali_policy(policy_name)
    stages = max(len(sub) for sub in policy.sub_policies)
    probabilities = auto_augment._sub_policy_to_probability_map(policy)[sub_policy]
    magnitude_bins = signed_bin(auto_augment._sub_policy_to_magnitude_bin_map(policy)[sub_policy], negate)
    aug_ids, augmentations = auto_augment._sub_policy_to_augmentation_map(policy)
    aug_ids = aug_ids[sub_policy]
    for stage in range(stages):
        if run[stage] < probabilities[stage]:
            images = pretty_select(augmentations[stage], aug_ids[stage],
                                   dict(data=images, magnitude_bin=magnitude_bins[stage],
                                        num_magnitude_bins=policy.num_magnitude_bins),
                                   auto_aug_name="apply_auto_augment", ref_suite_name="get_image_net_policy")
    return images
