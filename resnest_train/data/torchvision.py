"""The torchvision pipeline: the DALI pipeline's semantics with torchvision transforms and a DataLoader.

Used where DALI is unavailable, and as the reference the DALI path is compared with. Training shards with a
`DistributedSampler` (`drop_last`, so every rank takes the same number of batches); validation gives each
rank its own slice `files[rank::world]` with no padding, so every image is counted exactly once. An image
that cannot be decoded (broken inside despite a valid header and end) is skipped and named in the log.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import transforms as T

from resnest_train.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Lighting

log = logging.getLogger(__name__)

_INTERP = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}


class ImageListDataset(Dataset):
    def __init__(self, root: str, samples: list[tuple[str, int]], transform):
        self.root = Path(root)
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: int):
        # Try the following images when one cannot be decoded, so a bad file costs one sample, not the run.
        for offset in range(len(self.samples)):
            path, label = self.samples[(item + offset) % len(self.samples)]
            try:
                with Image.open(self.root / path) as image:
                    return self.transform(image.convert("RGB")), label
            except (OSError, ValueError) as exc:
                log.warning("skipping undecodable image %s: %s", self.root / path, exc)
        raise RuntimeError(f"no decodable image in {self.root}")


def train_transform(data_cfg) -> T.Compose:
    steps = [T.RandomResizedCrop(data_cfg.crop_size, scale=tuple(data_cfg.rrc_scale),
                                 interpolation=_INTERP[data_cfg.interpolation])]
    if data_cfg.hflip:
        steps.append(T.RandomHorizontalFlip())
    if data_cfg.autoaugment == "imagenet":
        steps.append(T.AutoAugment(T.AutoAugmentPolicy.IMAGENET))
    if data_cfg.color_jitter > 0:
        steps.append(T.ColorJitter(data_cfg.color_jitter, data_cfg.color_jitter, data_cfg.color_jitter))
    steps.append(T.ToTensor())
    if data_cfg.lighting > 0:
        steps.append(Lighting(data_cfg.lighting))
    steps.append(T.Normalize(IMAGENET_MEAN, IMAGENET_STD))
    return T.Compose(steps)


def val_transform(crop_size: int, resize_size: int, interpolation: str) -> T.Compose:
    return T.Compose([T.Resize(resize_size, interpolation=_INTERP[interpolation]), T.CenterCrop(crop_size),
                      T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start an epoch part-way, so a resumed run neither repeats nor skips images."""

    def __init__(self, dataset, *, start: int = 0, **kwargs):
        super().__init__(dataset, **kwargs)
        self.start = start

    def __iter__(self):
        indices = list(super().__iter__())[self.start:]
        self.start = 0
        return iter(indices)


class TorchLoader:
    """Moves batches to the device (and channels_last); exposes `set_epoch` for the sampler's shuffle."""

    def __init__(self, loader: DataLoader, device: torch.device, channels_last: bool):
        self.loader = loader
        self.device = device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.epoch = 0
        self.position = 0  # batches consumed in the current epoch

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if isinstance(self.loader.sampler, DistributedSampler):
            self.loader.sampler.set_epoch(epoch)

    def __iter__(self):
        for images, targets in self.loader:
            self.position += 1
            images = images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
            yield images, targets.to(self.device, non_blocking=True)
        self.position = 0

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}


def _loader_kwargs(workers: int, device: torch.device) -> dict:
    return dict(num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0)


def build_torch_train(index, data_cfg, *, batch_size: int, rank: int, world_size: int, seed: int,
                      device: torch.device, channels_last: bool, state: dict | None = None) -> TorchLoader:
    dataset = ImageListDataset(index.root, index.train, train_transform(data_cfg))
    position = (state or {}).get("position", 0)
    sampler = ResumableSampler(dataset, start=position * batch_size, num_replicas=world_size, rank=rank,
                               shuffle=True, seed=seed, drop_last=True)
    generator = torch.Generator().manual_seed(seed * 1000 + rank)  # workers' augmentation seeds per rank
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, generator=generator,
                        **_loader_kwargs(data_cfg.workers, device))
    train_loader = TorchLoader(loader, device, channels_last)
    train_loader.position = position
    return train_loader


def build_torch_val(index, data_cfg, *, batch_size: int, rank: int, world_size: int, device: torch.device,
                    crop_size: int, resize_size: int, channels_last: bool) -> TorchLoader:
    dataset = ImageListDataset(index.root, index.val[rank::world_size],
                               val_transform(crop_size, resize_size, data_cfg.interpolation))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, **_loader_kwargs(data_cfg.workers, device))
    return TorchLoader(loader, device, channels_last)
