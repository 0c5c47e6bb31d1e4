"""The one training data order, owned by the framework and followed by every backend (DALI, torchvision,
synthetic).

Epoch e's order is a permutation of the training list from (`train.seed`, e) alone. Optimizer step k uses
the images at positions [k G, (k + 1) G) of it (G: the global batch; the epoch's last partial global batch
is dropped). The step's G images are cut into G / b micro-batches of b consecutive images (b:
`train.batch_size`), and micro-batch m goes to process m mod W as its micro-step m div W (W: processes).
The micro-batches of every step are then the same for any process count, and the rest of an epoch can be
dealt to any number of processes from the step reached: every image of the epoch's order (up to its last
full global batch) is used exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from resnest_train.recipe.randomness import epoch_permutation
from resnest_train.recipe.schedule import BatchLayout


@dataclass(frozen=True)
class TrainOrder:
    """Process `rank`'s view of the data order."""

    seed: int
    num_samples: int
    layout: BatchLayout
    steps_per_epoch: int
    rank: int
    # (epoch, seed): that epoch keeps the order its seed dealt (a mid-epoch resume with another train.seed,
    # allowed by checkpoint.allow_changes: every image of the epoch still once; the new seed from the next)
    earlier_seed: tuple[int, int] | None = None

    @property
    def micro_batches_per_epoch(self) -> int:
        """What one process reads in a whole epoch."""
        return self.steps_per_epoch * self.layout.accumulation

    def micro_batch_index(self, micro_step: int) -> int:
        """The index within its step of the micro-batch this process reads at `micro_step`."""
        return micro_step * self.layout.world_size + self.rank

    def epoch_order(self, epoch: int) -> torch.Tensor:
        return epoch_permutation(self.epoch_seed(epoch), epoch, self.num_samples)

    def epoch_seed(self, epoch: int) -> int:
        """The seed that deals `epoch`'s order (checkpoints record it: a later mid-epoch resume keeps it)."""
        return self.earlier_seed[1] if self.earlier_seed and epoch == self.earlier_seed[0] else self.seed

    def rank_samples(self, epoch: int, start_step: int = 0) -> torch.Tensor:
        """Indices into the training list this process reads from `start_step` to the end of `epoch`, in
        reading order (micro-batches of `layout.micro_batch` consecutive samples)."""
        layout = self.layout
        used = self.epoch_order(epoch)[start_step * layout.global_batch:self.steps_per_epoch * layout.global_batch]
        # (steps * G,) -> (steps, accumulation, W, b): micro-batch m = micro_step * W + rank
        steps = used.view(-1, layout.accumulation, layout.world_size, layout.micro_batch)
        return steps[:, :, self.rank, :].reshape(-1)
