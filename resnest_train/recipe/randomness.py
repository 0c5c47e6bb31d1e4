"""The run's randomness, owned in one place: every random draw is seeded from what it belongs to (the run's
`train.seed` plus an epoch, a sample, a step, a micro-batch), never from how many processes drew before it.

So the data order, each image's augmentation (torchvision and synthetic backends), mixup's and CutMix's
draws and the DropBlock / drop-path / dropout masks of a micro-batch are the same whether 1 or 64 processes
train, and a resumed run draws what the uninterrupted one drew without carrying RNG state. Seeds are derived
with numpy's `SeedSequence` (a hash designed to give independent streams for distinct keys, NEP 19), one
stream tag per kind of draw. Each training image's augmentation is drawn from (seed, epoch, image) by
`data/draws.py` and handed to the backend that decodes it (DALI or torchvision).
"""

from __future__ import annotations

import random

import numpy as np
import torch

# Stream tags, one per kind of draw; the values are part of every seed (2 and 4 were retired streams: not reused)
ORDER, MICRO_BATCH, SYNTHETIC, AUGMENT, SHARD_ORDER = 1, 3, 5, 6, 7


def derive_seed(seed: int, stream: int, *keys: int) -> int:
    """A 62-bit seed for (seed, stream, keys): distinct keys give independent streams."""
    state = np.random.SeedSequence([seed, stream, *keys]).generate_state(1, dtype=np.uint64)[0]
    return int(state) >> 2


def epoch_permutation(seed: int, epoch: int, num_samples: int) -> torch.Tensor:
    """Epoch `epoch`'s order of the training list: a permutation from (seed, epoch) alone."""
    generator = torch.Generator().manual_seed(derive_seed(seed, ORDER, epoch))
    return torch.randperm(num_samples, generator=generator)


def shard_permutation(seed: int, epoch: int, num_shards: int) -> torch.Tensor:
    """Epoch `epoch`'s order of the training shards (data.shuffle=shards): a permutation from (seed, epoch)
    alone, on a stream of its own, independent of the samples' permutation that `epoch_permutation` draws."""
    generator = torch.Generator().manual_seed(derive_seed(seed, SHARD_ORDER, epoch))
    return torch.randperm(num_shards, generator=generator)


def _seed_global(value: int) -> None:
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)  # every device's default generator too (DropBlock and dropout masks on CUDA)


def seed_micro_batch(seed: int, step: int, micro_batch: int) -> None:
    """Before the forward pass of micro-batch `micro_batch` of optimizer step `step`: DropBlock, drop path
    and dropout draw their masks from torch's global generator."""
    _seed_global(derive_seed(seed, MICRO_BATCH, step, micro_batch))


def micro_batch_generator(seed: int, step: int, micro_batch: int) -> np.random.RandomState:
    """The generator of micro-batch `micro_batch`'s mix draws (whether to mix, mixup or CutMix, lambda, the
    box: mixing.py). Seeded with the value `seed_micro_batch` gives numpy's global generator, from which
    timm's Mixup drew them before, so a run with mixup alone draws the same lambdas as then."""
    return np.random.RandomState(derive_seed(seed, MICRO_BATCH, step, micro_batch) % 2**32)
