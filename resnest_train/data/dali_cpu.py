"""DALI's CPU path: the image ops a CPU pipeline runs on the host, chosen once as a set (`HostOps`).

Where DALI's CPU kernels are several times slower than torch's, numpy's or PIL's (the crop's resize, the
validation resize, saturation, the AutoAugment ops; per-op costs in BENCHMARKS.md), a CPU pipeline runs
those steps as `fn.python_function`s over the batch, in a small thread pool shared by the host ops (torch,
numpy and PIL release the GIL inside their kernels). Every random factor is still drawn by DALI's RNG in the
graph, so pipeline checkpoints stay exact. `HostOps` has the same methods as `dali.DaliOps` (DALI's own
ops, the GPU graph's), so the pipeline functions are one graph with no CPU/GPU branches.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from nvidia.dali import fn, types
from nvidia.dali.auto_aug import auto_augment
from nvidia.dali.pipeline import do_not_convert
from PIL import Image, ImageEnhance, ImageOps

_POOLS: dict[int, ThreadPoolExecutor] = {}
_GRAY = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale
FILL = (128, 128, 128)  # DALI's fill value for the warps
# Translation up to 150/331 of the image, the AutoAugment paper's ImageNet setting (331 px images).
MAX_TRANSLATE_REL = 150 / 331


def pool(threads: int) -> ThreadPoolExecutor:
    if threads not in _POOLS:
        _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="dali-host-op")
    return _POOLS[threads]


@do_not_convert  # built inside pipeline definitions: keep AutoGraph out of the plain Python it returns
def per_image(one, threads: int):
    """What `fn.python_function(*inputs, batch_processing=True)` calls: `one` on each sample's inputs, in
    the pool."""
    def batch(*inputs):
        return list(pool(threads).map(one, *inputs))
    return batch


# ------------------------------------------------------------------------------------------ resize, colour

def _resize(image: np.ndarray, height: int, width: int, mode: str) -> np.ndarray:
    chw = torch.from_numpy(image).permute(2, 0, 1)[None]  # a channels_last view: the kernel's fast layout
    out = F.interpolate(chw, size=(height, width), mode=mode, antialias=True, align_corners=False)
    return out[0].permute(1, 2, 0).contiguous().numpy()


def resize_one(image: np.ndarray, size: int, mode: str) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8, antialiased as PIL/torchvision resize."""
    return _resize(image, size, size, mode)


def resize_shorter_one(image: np.ndarray, size: int, mode: str) -> np.ndarray:
    """Shorter side to `size`, the longer one as torchvision's Resize(int) computes it (truncated)."""
    height, width = image.shape[:2]
    if height <= width:
        return _resize(image, size, int(size * width / height), mode)
    return _resize(image, int(size * height / width), size, mode)


def saturate_one(image: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """torchvision's adjust_saturation on (H, W, 3) uint8: blend with the grey image, clamp, truncate.
    Plain numpy element-wise passes: no BLAS or OpenMP threads to spin against the pipeline's own."""
    ratio = np.float32(factor.reshape(-1)[0])
    rgb = image.astype(np.float32)
    grey = rgb[..., 0] * _GRAY[0] + rgb[..., 1] * _GRAY[1] + rgb[..., 2] * _GRAY[2]
    rgb *= ratio
    rgb += ((1 - ratio) * grey)[..., None]
    return np.clip(rgb, 0, 255, out=rgb).astype(np.uint8)


# ------------------------------------------------------------------------------------------ AutoAugment

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
    """Called by `fn.python_function(images, sub_policy, run, negate, batch_processing=True)` with the draws
    of DALI's `apply_auto_augment`: a sub-policy, a uniform per stage, a sign per stage."""

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


# ------------------------------------------------------------------------------------------ the op set

def _host(function):
    return do_not_convert(function)  # plain Python inside a graph built with enable_conditionals


class HostOps:
    """The host versions of `dali.DaliOps`' methods, for pipelines that run on the CPU."""

    def __init__(self, *, interpolation: str, threads: int):
        self.interpolation = interpolation
        self.threads = threads
        self._saturate = _host(per_image(saturate_one, threads))
        self._autoaugment = None  # built on first use: the table lookups are not free

    def resize(self, images, size: int):
        resize = per_image(functools.partial(resize_one, size=size, mode=self.interpolation), self.threads)
        return fn.python_function(images, function=_host(resize), batch_processing=True, output_layouts="HWC")

    def resize_shorter(self, images, size: int):
        resize = per_image(functools.partial(resize_shorter_one, size=size, mode=self.interpolation),
                           self.threads)
        return fn.python_function(images, function=_host(resize), batch_processing=True, output_layouts="HWC")

    def color_twist(self, images, *, brightness, contrast, saturation):
        images = fn.brightness_contrast(images, brightness=brightness, contrast=contrast)
        return fn.python_function(images, saturation, function=self._saturate, batch_processing=True,
                                  output_layouts="HWC")

    def autoaugment(self, images, *, shape=None):
        """`shape` is not needed here: PIL's ops read each image's own size."""
        if self._autoaugment is None:
            self._autoaugment = HostAutoAugment(self.threads)
        augment = self._autoaugment
        sub_policy = fn.random.uniform(values=list(range(len(augment.sub_policies))), dtype=types.INT32)
        run = fn.random.uniform(range=[0, 1], shape=(augment.stages,))
        negate = fn.random.coin_flip(shape=(augment.stages,))
        return fn.python_function(images, sub_policy, run, negate, function=_host(augment.__call__),
                                  batch_processing=True, output_layouts="HWC")
