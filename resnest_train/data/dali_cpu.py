"""DALI's CPU path: the image ops a CPU pipeline runs on the host, chosen once as a set (`HostOps`).

Where DALI's CPU kernels are several times slower than torch's, numpy's or PIL's (the crop's resize, the
validation resize, saturation, the AutoAugment ops; per-op costs in BENCHMARKS.md; RandAugment's are the
same ops), a CPU pipeline runs those steps as `fn.python_function`s over the batch, in a small thread pool
shared by the host ops (torch, numpy and PIL release the GIL inside their kernels). Every random factor is
drawn by the framework (draws.py) and reaches these ops as per-sample inputs. `HostOps` has the same methods
as `dali.DaliOps` (DALI's own ops, the GPU graph's), so the pipeline functions are one graph with no CPU/GPU
branches.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from nvidia.dali import fn
from nvidia.dali.pipeline import do_not_convert
from PIL import Image

from resnest_train.data.autoaugment import POLICIES, apply_sub_policy, resolve
from resnest_train.data.crops import INTERPOLATIONS
from resnest_train.data.randaugment import RandAugmentSpec, apply_rand_augment, is_rand_augment, parse_rand_augment

_POOLS: dict[int, ThreadPoolExecutor] = {}
_GRAY = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale


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


def resize_fed_one(image: np.ndarray, *fed: np.ndarray, size: int | None, mode: str, fed_size: bool,
                   fed_interp: bool) -> np.ndarray:
    """`resize_one` with what is fed per sample: the epoch's size (progressive resizing, one float per image;
    first) and the image's drawn interpolation (data.crop=inception, an index into crops.INTERPOLATIONS)."""
    values = list(fed)
    side = int(values.pop(0).reshape(-1)[0]) if fed_size else size
    return _resize(image, side, side, INTERPOLATIONS[int(values.pop(0))] if fed_interp else mode)


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


# ------------------------------------------------------------------------------------------ AutoAugment, RandAugment

class HostAutoAugment:
    """Called by `fn.python_function(images, sub_policy, run, negate, batch_processing=True)` with DALI's
    draws (a sub-policy index, a uniform per stage, a sign per stage); the policy's PIL ops (autoaugment.py,
    the definition every backend shares) run per image in the shared thread pool."""

    def __init__(self, threads: int, policy_name: str):
        self.sub_policies = resolve(POLICIES[policy_name])
        self.stages = max(len(sub) for sub in self.sub_policies)
        self._batch = per_image(self.one, threads)

    def __call__(self, images, sub_policy, run, negate):
        return self._batch(images, sub_policy, run, negate)

    def one(self, image: np.ndarray, sub_policy: np.ndarray, run: np.ndarray, negate: np.ndarray) -> np.ndarray:
        steps = self.sub_policies[int(sub_policy)]
        if not any(run[stage] < step[1] for stage, step in enumerate(steps)):
            return image
        return np.asarray(apply_sub_policy(Image.fromarray(image), steps, run, negate))


class HostRandAugment:
    """Called by `fn.python_function(images, op, run, arg, batch_processing=True)` with the framework's
    RandAugment draws (an op index, a uniform and an argument per layer: draws.py); the PIL ops run per image
    in the shared thread pool, as `HostAutoAugment`'s."""

    def __init__(self, threads: int, spec: RandAugmentSpec):
        self.spec = spec
        self._batch = per_image(self.one, threads)

    def __call__(self, images, op, run, arg):
        return self._batch(images, op, run, arg)

    def one(self, image: np.ndarray, op: np.ndarray, run: np.ndarray, arg: np.ndarray) -> np.ndarray:
        if not (run < self.spec.prob).any():
            return image
        return np.asarray(apply_rand_augment(Image.fromarray(image), self.spec, op, run, arg))


# ------------------------------------------------------------------------------------------ the op set

def _host(function):
    return do_not_convert(function)  # plain Python inside a graph built with enable_conditionals


class HostOps:
    """The host versions of `dali.DaliOps`' methods, for pipelines that run on the CPU."""

    def __init__(self, *, interpolation: str, threads: int, autoaugment: str):
        self.interpolation = interpolation
        self.threads = threads
        self.policy = autoaugment
        self._saturate = _host(per_image(saturate_one, threads))
        self._autoaugment = None  # built on first use: the table lookups are not free

    def resize(self, images, size, interp=None):
        """`size`: an int, or a per-sample input (the epoch's crop under progressive resizing); `interp`: each
        image's drawn interpolation (data.crop=inception)."""
        fed_size = not isinstance(size, int)
        if fed_size or interp is not None:
            inputs = [value for value in (size if fed_size else None, interp) if value is not None]
            resize = per_image(functools.partial(resize_fed_one, size=None if fed_size else size,
                                                 mode=self.interpolation, fed_size=fed_size,
                                                 fed_interp=interp is not None), self.threads)
            return fn.python_function(images, *inputs, function=_host(resize), batch_processing=True,
                                      output_layouts="HWC")
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

    def autoaugment(self, images, *draws):
        """With the framework's draws per image (draws.py; `draws.augment_inputs` names them)."""
        if self._autoaugment is None:
            self._autoaugment = (HostRandAugment(self.threads, parse_rand_augment(self.policy))
                                 if is_rand_augment(self.policy) else HostAutoAugment(self.threads, self.policy))
        augment = self._autoaugment
        return fn.python_function(images, *draws, function=_host(augment.__call__), batch_processing=True,
                                  output_layouts="HWC")
