"""The resolved data plan: every value a backend needs, derived once from `DataConfig` + `DistInfo`.

Backends receive this frozen value and nothing else from the config: crop and resize sizes (the
crop -> resize rule lives here), interpolation, the memory layout batches arrive in, the device they arrive
on, where DALI decodes, and the shard rule of the validation list. Trainer and evaluator build the same
plan, so they cannot disagree on any of it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from resnest_train.cluster.distributed import DistInfo
from resnest_train.config import Config
from resnest_train.errors import UserError


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

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

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
        crop=data.crop, crop_min_area=data.crop_min_area)
