"""AutoAugment's ImageNet policy for DALI's CPU pipeline: DALI's policy and random draws, PIL's image ops.

`nvidia.dali.auto_aug` runs a policy by splitting the batch between its ops per stage: on the CPU that costs
~0.8 ms of a thread per image (sub-batches of a few images per op, and slow CPU kernels for `color` and
`auto_contrast`), the largest cost of the CPU pipeline with AutoAugment (BENCHMARKS.md), while the PIL
ops torchvision's AutoAugment uses take ~0.1 ms. So on CPU the pipeline draws what DALI's `apply_auto_augment`
draws (a sub-policy per image, a uniform per stage against its probability, a sign per stage) with DALI's
RNG — reproducible and checkpointed with the pipeline — and applies that sub-policy of DALI's own
`get_image_net_policy()` table (ops, probabilities, magnitude bins and ranges) with PIL in a thread pool.
GPU pipelines run `nvidia.dali.auto_aug` itself.
"""

from __future__ import annotations

import numpy as np
from nvidia.dali.auto_aug import auto_augment
from PIL import Image, ImageEnhance, ImageOps

from resnest_train.data.cpu_ops import per_image

FILL = (128, 128, 128)  # DALI's fill value for the warps
# Translation up to 150/331 of the image, the AutoAugment paper's ImageNet setting (331 px images).
MAX_TRANSLATE_REL = 150 / 331


def image_net_policy():
    """DALI's ImageNet policy, translations relative to the image size (the same table on CPU and GPU)."""
    return auto_augment.get_image_net_policy(use_shape=True, max_translate_rel=MAX_TRANSLATE_REL)


def _affine(image: Image.Image, coefficients) -> Image.Image:
    return image.transform(image.size, Image.AFFINE, coefficients, Image.NEAREST, fillcolor=FILL)


def _solarize_add(image: Image.Image, shift: float) -> Image.Image:
    lut = [min(255, i + int(shift)) if i < 128 else i for i in range(256)]
    return image.point(lut * 3)


_OPS = {
    "shear_x": lambda im, m: _affine(im, (1, m, 0, 0, 1, 0)),
    "shear_y": lambda im, m: _affine(im, (1, 0, 0, m, 1, 0)),
    "translate_x": lambda im, m: _affine(im, (1, 0, m * im.size[0], 0, 1, 0)),
    "translate_y": lambda im, m: _affine(im, (1, 0, 0, 0, 1, m * im.size[1])),
    "rotate": lambda im, m: im.rotate(m, Image.NEAREST, fillcolor=FILL),
    "color": lambda im, m: ImageEnhance.Color(im).enhance(m),
    "posterize": lambda im, m: ImageOps.posterize(im, int(min(8, max(1, round(m))))),
    "solarize": lambda im, m: ImageOps.solarize(im, m),
    "solarize_add": _solarize_add,
    "invert": lambda im, m: ImageOps.invert(im),
    "equalize": lambda im, m: ImageOps.equalize(im),
    "auto_contrast": lambda im, m: ImageOps.autocontrast(im),
}


class HostAutoAugment:
    """Called by `fn.python_function(images, sub_policy, run, negate, batch_processing=True)`."""

    def __init__(self, threads: int):
        policy = image_net_policy()
        self.stages = max(len(sub) for sub in policy.sub_policies)
        # Per step: (op name, probability, magnitude, negatable), magnitudes looked up once from the bins.
        self.sub_policies = [[(aug.name, prob, _magnitude(aug, magnitude_bin, policy.num_magnitude_bins),
                               aug.randomly_negate) for aug, prob, magnitude_bin in sub]
                             for sub in policy.sub_policies]
        unknown = {step[0] for sub in self.sub_policies for step in sub} - set(_OPS)
        if unknown:
            raise NotImplementedError(f"AutoAugment ops without a CPU implementation: {sorted(unknown)}")
        self._batch = per_image(self.one, threads)

    def __call__(self, images, sub_policy, run, negate):
        return self._batch(images, sub_policy, run, negate)

    def one(self, image: np.ndarray, sub_policy: np.ndarray, run: np.ndarray, negate: np.ndarray) -> np.ndarray:
        steps = [(stage, step) for stage, step in enumerate(self.sub_policies[int(sub_policy)])
                 if run[stage] < step[1]]
        if not steps:
            return image
        pil = Image.fromarray(image)
        for stage, (name, _, magnitude, negatable) in steps:
            pil = _OPS[name](pil, -magnitude if negatable and negate[stage] else magnitude)
        return np.asarray(pil)


def _magnitude(aug, magnitude_bin, bins: int) -> float:
    """The bin's magnitude in the op's range, as DALI's `Augmentation` computes it (0 for ops without one)."""
    if magnitude_bin is None:
        return 0.0
    return float(np.linspace(*aug.mag_range, bins)[magnitude_bin])
