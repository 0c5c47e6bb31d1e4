"""Image ops of DALI's CPU pipelines done faster on the host: the resizes (training crop, validation
shorter side) and saturation.

DALI's CPU resampling costs ~1 ms of a thread per random crop and its CPU `color_twist` another ~1 ms (its
saturation; brightness and contrast are nearly free), together about half of an image's time in the
pipeline (BENCHMARKS.md). torch's vectorised uint8 antialiased resize, the kernel torchvision's v2
transforms use, takes ~0.2 ms and matches PIL's filter; saturation in numpy takes ~0.2 ms and is
torchvision's `adjust_saturation` formula. The ops run inside the pipeline as `python_function`s over a
batch of HWC uint8 arrays, with a small thread pool shared by the host ops (torch, numpy and PIL release
the GIL inside their kernels); their random factors come from DALI's RNG, so pipeline checkpoints stay
exact. GPU pipelines use DALI's own ops.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

_POOLS: dict[int, ThreadPoolExecutor] = {}
_GRAY = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale


def pool(threads: int) -> ThreadPoolExecutor:
    if threads not in _POOLS:
        _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="dali-host-op")
    return _POOLS[threads]


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


def per_image(one, threads: int):
    """What `fn.python_function(*inputs, batch_processing=True)` calls: `one` on each sample's inputs, in
    the pool."""
    def batch(*inputs):
        return list(pool(threads).map(one, *inputs))
    return batch


def batch_resizer(size: int, mode: str, threads: int):
    """The training crops resized to size x size."""
    return per_image(functools.partial(resize_one, size=size, mode=mode), threads)


def batch_shorter_resizer(size: int, mode: str, threads: int):
    """The validation resize: each image's shorter side to `size`, aspect ratio kept."""
    return per_image(functools.partial(resize_shorter_one, size=size, mode=mode), threads)


def batch_saturator(threads: int):
    """Saturation of each image by its factor: called with (images, factors)."""
    return per_image(saturate_one, threads)
