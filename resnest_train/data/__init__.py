"""Data loaders from config: `build_train_loader` / `build_val_loader` pick the backend (dali,
torchvision, synthetic); every loader yields (images, targets) on the training device and has `len()`."""

from __future__ import annotations

import torch

from resnest_train.config import Config
from resnest_train.data.index import DatasetError, DatasetIndex, load_index, warn_skipped
from resnest_train.data.synthetic import build_synthetic
from resnest_train.distributed import DistInfo

__all__ = ["build_train_loader", "build_val_loader", "load_index", "warn_skipped", "DatasetError",
           "DatasetIndex", "dali_device"]


def dali_device(setting: str, device: torch.device) -> str:
    """`auto`: decode on the GPU (nvJPEG) when training there, else on the CPU."""
    if setting == "gpu" and device.type != "cuda":
        raise DatasetError("data.dali_device=gpu needs CUDA, which is not available here")
    if setting == "auto":
        return "gpu" if device.type == "cuda" else "cpu"
    return setting


def _import_dali():
    try:
        from resnest_train.data import dali
    except ImportError as exc:
        raise DatasetError(f"data.backend=dali but DALI cannot be imported ({exc}); install "
                           "nvidia-dali-cuda130 (or -cuda120) or use data.backend=torchvision") from None
    return dali


def build_train_loader(config: Config, dist: DistInfo, index: DatasetIndex | None, state=None):
    """`state`: what the loader's `state()` returned when the checkpoint was taken (resume position)."""
    data, train = config.data, config.train
    common = dict(batch_size=train.batch_size, channels_last=train.channels_last)
    if data.backend == "synthetic":
        return build_synthetic(data, split="train", world_size=dist.world_size, image_size=data.crop_size,
                               num_classes=config.model.num_classes, device=dist.device,
                               seed=train.seed + dist.rank, state=state, **common)
    if data.backend == "dali":
        return _import_dali().build_dali_train(
            index, data, rank=dist.rank, world_size=dist.world_size, seed=train.seed,
            device=dali_device(data.dali_device, dist.device), state=state, **common)
    from resnest_train.data.torchvision import build_torch_train
    return build_torch_train(index, data, rank=dist.rank, world_size=dist.world_size, seed=train.seed,
                             device=dist.device, state=state, **common)


def build_val_loader(config: Config, dist: DistInfo, index: DatasetIndex | None, crop_size: int,
                     resize_size: int, batch_size: int | None = None):
    data = config.data
    common = dict(batch_size=batch_size or config.train.batch_size, channels_last=config.train.channels_last)
    if data.backend == "synthetic":
        return build_synthetic(data, split="val", world_size=dist.world_size, image_size=crop_size,
                               num_classes=config.model.num_classes, device=dist.device,
                               seed=config.train.seed + 7919, **common)
    if data.backend == "dali":
        return _import_dali().build_dali_val(
            index, data, rank=dist.rank, world_size=dist.world_size, crop_size=crop_size, resize_size=resize_size,
            device=dali_device(data.dali_device, dist.device), **common)
    from resnest_train.data.torchvision import build_torch_val
    return build_torch_val(index, data, rank=dist.rank, world_size=dist.world_size, device=dist.device,
                           crop_size=crop_size, resize_size=resize_size, **common)
