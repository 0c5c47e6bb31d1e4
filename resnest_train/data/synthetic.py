"""The synthetic backend: random tensors of the right shape and labels, to measure the trainer without any
decoding cost. Training sample i is pool image i mod P with its own random label: a small pool of random
images made on the training device once (again for each new size under progressive resizing), gathered per
micro-batch of the reader (`reader.py`), so the synthetic backend reads the same samples as the others, and a
gather is a fresh tensor (in-place work downstream, mixup, never changes what later batches hold)."""

from __future__ import annotations

import torch

from resnest_train.data.order import TrainOrder
from resnest_train.data.plan import DataPlan
from resnest_train.data.reader import EpochCursor, ReaderLoader
from resnest_train.recipe.randomness import SYNTHETIC, derive_seed

POOL = 64  # distinct images: enough that mixup's pairs differ, small enough to make at once on any device


def _random_images(plan: DataPlan, count: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(count, 3, size, size, generator=generator)
    labels = torch.randint(0, plan.num_classes, (count,), generator=generator)
    return images.to(plan.device).contiguous(memory_format=plan.memory_format), labels.to(plan.device)


class SyntheticTrainLoader(ReaderLoader):
    """The `Loader` over the reader's micro-batches: pool images, labelled per sample."""

    def __init__(self, plan: DataPlan, order: TrainOrder, *, start: tuple[int, int] = (0, 0)):
        self.reader, self.plan = EpochCursor(order, start), plan
        self.pool_count = min(POOL, order.num_samples)
        self.pool, _ = _random_images(plan, self.pool_count, plan.crop_size, derive_seed(plan.seed, SYNTHETIC, 0))
        generator = torch.Generator().manual_seed(derive_seed(plan.seed, SYNTHETIC, 1))
        self.labels = torch.randint(0, plan.num_classes, (order.num_samples,), generator=generator).to(plan.device)
        self.memory_format = plan.memory_format
        self.samples = torch.empty(0, dtype=torch.long)

    def set_epoch(self, epoch: int) -> None:
        self.samples = torch.from_numpy(self.reader.set_epoch(epoch))
        size = self.plan.train_size(epoch)
        if size != self.pool.shape[-1]:  # progressive resizing: a pool of the epoch's size, from the same seed
            self.pool, _ = _random_images(self.plan, self.pool_count, size, derive_seed(self.plan.seed, SYNTHETIC, 0))

    def __iter__(self):
        pool_index = (self.samples % self.pool.shape[0]).to(self.pool.device)
        sample_index = self.samples.to(self.labels.device)
        while self.reader.position < self.samples.shape[0]:
            row = self.reader.position
            self.reader.delivered(self.samples[row])
            images = self.pool[pool_index[row]].contiguous(memory_format=self.memory_format)
            yield images, self.labels[sample_index[row]]


class SyntheticLoader:
    """Validation: `num_batches` copies of one random batch (counts, not accuracy, are what it measures)."""

    def __init__(self, plan: DataPlan, *, num_batches: int, batch_size: int, seed: int):
        self.images, self.targets = _random_images(plan, batch_size, plan.val_crop_size, seed)
        self.num_batches = num_batches
        self.delivered: list[int] = []

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        batch = self.targets.numel()
        self.delivered = list(range(self.num_batches * batch))
        for _ in range(self.num_batches):
            yield self.images.clone(), self.targets.clone()

    def close(self) -> None:
        """Nothing to release: the pipeline's threads end with it."""


def build_synthetic_train(plan: DataPlan, samples: None, order: TrainOrder, *, start: tuple[int, int] = (0, 0),
                          replacement=None) -> SyntheticTrainLoader:
    """`samples` and `replacement`: none (no files, nothing undecodable), for the backends' one signature."""
    return SyntheticTrainLoader(plan, order, start=start)


def build_synthetic_val(plan: DataPlan, shard: None, *, batch_size: int) -> SyntheticLoader:
    per_rank = max(1, plan.synthetic_size // 4) // plan.world_size
    return SyntheticLoader(plan, num_batches=max(1, -(-per_rank // batch_size)), batch_size=batch_size,
                           seed=plan.seed + 7919)
