"""Random tensors of the right shape and labels: measures the trainer without any decoding cost."""

from __future__ import annotations

import torch


class SyntheticLoader:
    """`num_batches` batches of one pre-made random batch (on the device); labels are random classes."""

    def __init__(self, *, num_batches: int, batch_size: int, image_size: int, num_classes: int,
                 device: torch.device, channels_last: bool, seed: int, state: dict | None = None):
        generator = torch.Generator().manual_seed(seed)
        images = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.images = images.to(device).contiguous(memory_format=memory_format)
        self.targets = torch.randint(0, num_classes, (batch_size,), generator=generator).to(device)
        self.num_batches = num_batches
        self.position = (state or {}).get("position", 0)  # batches consumed in the current epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        while self.position < self.num_batches:
            self.position += 1
            yield self.images, self.targets
        self.position = 0

    def state(self) -> dict:
        return {"position": self.position}


def build_synthetic(data_cfg, *, split: str, batch_size: int, world_size: int, image_size: int,
                    num_classes: int, device: torch.device, channels_last: bool, seed: int,
                    state: dict | None = None) -> SyntheticLoader:
    images = data_cfg.synthetic_size if split == "train" else max(1, data_cfg.synthetic_size // 4)
    per_rank = images // world_size
    num_batches = per_rank // batch_size if split == "train" else -(-per_rank // batch_size)
    return SyntheticLoader(num_batches=max(1, num_batches), batch_size=batch_size, image_size=image_size,
                           num_classes=num_classes, device=device, channels_last=channels_last, seed=seed,
                           state=state)
