"""The synthetic backend: random tensors of the right shape and labels, to measure the trainer without any
decoding cost. Each batch is a fresh copy of one pre-made random batch (made on the training device once),
so in-place work downstream (mixup) never changes what later batches hold."""

from __future__ import annotations

import torch

from resnest_train.data.plan import DataPlan


class SyntheticLoader:
    """The `Loader` over `num_batches` copies of one random batch; labels are random classes."""

    def __init__(self, plan: DataPlan, *, num_batches: int, batch_size: int, image_size: int, seed: int,
                 state: dict | None = None):
        generator = torch.Generator().manual_seed(seed)
        images = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
        self.images = images.to(plan.device).contiguous(memory_format=plan.memory_format)
        self.targets = torch.randint(0, plan.num_classes, (batch_size,), generator=generator).to(plan.device)
        self.num_batches = num_batches
        self.position = (state or {}).get("position", 0)  # batches consumed in the current epoch
        self.delivered: list[int] = []

    def __len__(self) -> int:
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        """Nothing to do: every epoch holds the same batches."""

    def __iter__(self):
        batch = self.targets.numel()
        self.delivered = []
        while self.position < self.num_batches:
            self.delivered.extend(range(self.position * batch, (self.position + 1) * batch))
            self.position += 1
            yield self.images.clone(), self.targets.clone()
        self.position = 0

    def state(self) -> dict:
        return {"position": self.position}


def build_synthetic_train(plan: DataPlan, *, batch_size: int, state: dict | None = None) -> SyntheticLoader:
    batches = max(1, plan.synthetic_size // plan.world_size // batch_size)
    return SyntheticLoader(plan, num_batches=batches, batch_size=batch_size, image_size=plan.crop_size,
                           seed=plan.seed + plan.rank, state=state)


def build_synthetic_val(plan: DataPlan, *, batch_size: int) -> SyntheticLoader:
    per_rank = max(1, plan.synthetic_size // 4) // plan.world_size
    return SyntheticLoader(plan, num_batches=max(1, -(-per_rank // batch_size)), batch_size=batch_size,
                           image_size=plan.val_crop_size, seed=plan.seed + 7919)
