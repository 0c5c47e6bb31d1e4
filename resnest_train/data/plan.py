"""The resolved data plan: every value a backend needs, derived once from `DataConfig` + `DistInfo`.

Backends receive this frozen value and nothing else from the config: crop and resize sizes (the
crop -> resize rule lives here, and so does the training crop of each epoch under progressive resizing,
`train_size`, which every backend, the draws and the metrics ask), interpolation, the memory layout batches
arrive in, the device they arrive on, where DALI decodes, and the shard rule of the validation list. Trainer
and evaluator build the same plan, so they cannot disagree on any of it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from resnest_train.cluster.distributed import DistInfo
from resnest_train.config import Config
from resnest_train.errors import UserError

SIZE_STEP = 32  # progressive resizing's sizes are multiples of 32 (FFCV's ImageNet example rounds to them)


def progressive_size(progressive: tuple[int, int, int, int] | None, crop_size: int, epoch: int) -> int:
    """The training crop of epoch index `epoch` (0 for the first epoch, as `set_epoch` counts).

    `progressive` = (start_size, end_size, start_epoch, end_epoch), epochs numbered from 1 as metrics.jsonl
    numbers them: epochs 1..start_epoch train at start_size, epochs end_epoch.. at end_size, and those
    between at the linear interpolation rounded to the nearest multiple of 32 (half to even), the rule of
    FFCV's ImageNet example (`get_resolution` in libffcv/ffcv-imagenet's train_imagenet.py, which counts
    epochs from 0: its start_ramp/end_ramp are start_epoch - 1 / end_epoch - 1 here). None: `crop_size`.
    A function of the epoch alone, so a resume anywhere in an epoch continues at its size."""
    if progressive is None:
        return crop_size
    start_size, end_size, start_epoch, end_epoch = progressive
    number = epoch + 1
    if number <= start_epoch:
        return start_size
    if number >= end_epoch:
        return end_size
    size = np.interp(number, [start_epoch, end_epoch], [start_size, end_size])  # FFCV's arithmetic, float64
    return int(np.round(size / SIZE_STEP)) * SIZE_STEP


def resize_size(crop_size: int, ratio: float) -> int:
    """Shorter-side resize for a center crop: ceil(crop / ratio), with 224 / 0.875 -> 256 exactly."""
    return math.ceil(round(crop_size / ratio, 6))


@dataclass(frozen=True)
class DataPlan:
    backend: str  # dali | torchvision | synthetic
    root: str
    rank: int
    world_size: int
    device: torch.device  # where batches are delivered: the training device
    decoder: str  # where DALI decodes and augments: "gpu" (nvJPEG, `mixed`) or "cpu"
    channels_last: bool  # batches arrive in the model's memory format
    workers: int
    seed: int
    num_classes: int
    synthetic_size: int
    crop_size: int
    rrc_scale: tuple[float, float]
    hflip: bool
    autoaugment: str
    autoaugment_on: str
    color_jitter: float
    lighting: float
    interpolation: str  # bilinear | bicubic: torchvision's InterpolationMode values and torch's modes
    val_crop_size: int
    val_resize_size: int
    crop: str = "random_resized"  # the training crop's window rule (crops.py)
    crop_min_area: float = 0.1  # the efficientnet crop's smallest area fraction
    progressive_resize: tuple[int, int, int, int] | None = None  # data.progressive_resize: see `train_size`
    # a remote root (store.py): its shards' brace patterns by split, the node's cache (shard_cache.py)
    shard_patterns: tuple[tuple[str, str], ...] = ()
    cache_dir: str | None = None
    cache_limit: int | None = None
    prefetch_shards: int = 0

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def train_size(self, epoch: int) -> int:
        """The training crop of epoch index `epoch`: `crop_size`, or the progressive-resizing ramp's size."""
        return progressive_size(self.progressive_resize, self.crop_size, epoch)

    def shard(self, samples: list) -> list:
        """This rank's slice of an evaluation list: no padding, so every sample is counted exactly once."""
        return samples[self.rank::self.world_size]

    def with_val_crop(self, crop_size: int, resize: int | None, ratio: float) -> DataPlan:
        """The same plan evaluated at another crop: resize = `resize`, or ceil(crop / ratio)."""
        return dataclasses.replace(self, val_crop_size=crop_size,
                                   val_resize_size=resize or resize_size(crop_size, ratio))


def decoder_device(setting: str, device: torch.device) -> str:
    """`auto`: decode on the GPU (nvJPEG) when training there, else on the CPU."""
    if setting == "gpu" and device.type != "cuda":
        raise UserError("data.dali_device=gpu needs CUDA, which is not available here")
    if setting == "auto":
        return "gpu" if device.type == "cuda" else "cpu"
    return setting


def build_data_plan(config: Config, dist: DistInfo) -> DataPlan:
    data = config.data
    return DataPlan(
        backend=data.backend, root=data.root, rank=dist.rank, world_size=dist.world_size, device=dist.device,
        decoder=decoder_device(data.dali_device, dist.device), channels_last=config.train.channels_last,
        workers=data.workers, seed=config.train.seed, num_classes=config.model.num_classes,
        synthetic_size=data.synthetic_size, crop_size=data.crop_size, rrc_scale=tuple(data.rrc_scale),
        hflip=data.hflip, autoaugment=data.autoaugment, autoaugment_on=data.autoaugment_on,
        color_jitter=data.color_jitter, lighting=data.lighting, interpolation=data.interpolation,
        val_crop_size=data.val_crop_size,
        val_resize_size=data.val_resize_size or resize_size(data.val_crop_size, data.val_resize_ratio),
        crop=data.crop, crop_min_area=data.crop_min_area,
        progressive_resize=data.progressive_resize,
        shard_patterns=tuple((split, pattern) for split, pattern in (("train", data.train_shards),
                                                                     ("val", data.val_shards)) if pattern),
        cache_dir=data.cache_dir, cache_limit=data.cache_limit, prefetch_shards=data.prefetch_shards)
