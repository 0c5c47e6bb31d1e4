"""The one training data order, owned by the framework and followed by every backend (DALI, torchvision,
synthetic).

Epoch e's order is a permutation of the training list from (`train.seed`, e) alone. Optimizer step k uses
the images at positions [k G, (k + 1) G) of it (G: the global batch; the epoch's last partial global batch
is dropped). The step's G images are cut into G / b micro-batches of b consecutive images (b:
`train.batch_size`), and micro-batch m goes to process m mod W as its micro-step m div W (W: processes).
The micro-batches of every step are then the same for any process count, and the rest of an epoch can be
dealt to any number of processes from the step reached: every image of the epoch's order (up to its last
full global batch) is used exactly once.

Repeated augmentation (`train.repeated_augment` = k > 1; Hoffer et al., arXiv 1901.09335, dealt as DeiT's
RASampler and timm's RepeatAugSampler deal it): the epoch's list is the permutation with each image
repeated k times in a row ([a, a, a, b, b, b, ...], timm's `repeat_interleave`), cut to the training list's
length N, so an epoch keeps its number of images and of steps and trains the first ceil(N / k) images of
the permutation k times each (timm and DeiT keep the first N of the repeated list, rounded down to a
multiple of 256; here the epoch's last partial global batch is dropped, as without repeats). timm deals the
repeated list to its ranks in turn so that "each augmented version of a sample will be visible to a
different process"; a step's G positions are dealt the same way to its M = G / b micro-batches: micro-batch
m holds the step's positions m, m + M, m + 2M, ..., so the copies of an image train in the same step (or
two consecutive ones where k does not divide G), in different micro-batches (other processes or
micro-steps; never normalised together by BatchNorm when M >= k), whatever the process count. A copy is
named by its position mod k, and its augmentation is drawn from it (draws.py). k = 1 is the order above,
unchanged.

`data.shuffle` chooses the permutation; everything above deals it. `global` (the default) permutes all N
images. `shards` is an order a node-local shard cache smaller than the data can serve (data in an object
store): with a global permutation every micro-batch reads from random shards and a bounded cache thrashes.
The shards (the training list's tar files, `SampleList.dir_ids`) are permuted from (seed, epoch), the
permuted list is cut into windows of `data.shuffle_window` consecutive shards, and the epoch's list is
window 0's images, then window 1's, ..., each window's images in a random order from (seed, epoch): the
global permutation's order restricted to the window (a stable sort of it by window), so a window as large as
the whole list gives the global order back. The shards' permutation has a stream of its own
(`randomness.shard_permutation`). A reader then needs about one window of shards at a time (WebDataset's
shard shuffle plus a sample buffer, and FFCV's QUASI_RANDOM order, trade randomness for locality the same
way); a window should hold many classes, which `scripts/pack_dataset.py --shuffle` makes sure of.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from resnest_train.config import ConfigError
from resnest_train.recipe.randomness import epoch_permutation, shard_permutation
from resnest_train.recipe.schedule import BatchLayout


def shuffle_record(shuffle: str, window: int) -> dict:
    """How an epoch is dealt, as a checkpoint records it (`format.Checkpoint.epoch_shuffle`): data.shuffle
    and, for shards, data.shuffle_window."""
    return {"shuffle": shuffle} if shuffle == "global" else {"shuffle": shuffle, "window": window}


def shard_groups(shuffle: str, index, root: str) -> torch.Tensor | None:
    """The training samples' shards for data.shuffle=shards (None for global), from the dataset index
    (`index.DatasetIndex` of `root`); a dataset of class folders has none to window."""
    if shuffle == "global":
        return None
    if index is None or index.layout != "shards":
        raise ConfigError(f"data.shuffle=shards needs a shard dataset (train/*.tar), but {root} holds class "
                          "folders: pack it with scripts/pack_dataset.py --shuffle SEED, or set data.shuffle=global")
    return torch.from_numpy(index.train.dir_ids.astype(np.int64))


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
    repeats: int = 1  # train.repeated_augment: copies of each image in the epoch's list
    # data.shuffle=shards: each training sample's shard (`shard_groups`), None for data.shuffle=global
    groups: torch.Tensor | None = field(default=None, repr=False, compare=False)
    window: int = 1  # data.shuffle_window: the shards whose images are shuffled together

    @property
    def shuffle(self) -> dict:
        """How every epoch of this run is dealt (`shuffle_record`), as checkpoints record it."""
        return shuffle_record("global" if self.groups is None else "shards", self.window)

    @property
    def num_shards(self) -> int:
        return int(self.groups.max()) + 1 if self.groups is not None and len(self.groups) else 0

    @property
    def micro_batches_per_epoch(self) -> int:
        """What one process reads in a whole epoch."""
        return self.steps_per_epoch * self.layout.accumulation

    def micro_batch_index(self, micro_step: int) -> int:
        """The index within its step of the micro-batch this process reads at `micro_step`."""
        return micro_step * self.layout.world_size + self.rank

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The epoch's list of training-list indices (N long): the permutation (in shard windows for
        data.shuffle=shards), each image repeated."""
        seed = self.epoch_seed(epoch)
        order = epoch_permutation(seed, epoch, self.num_samples)
        if self.groups is not None:
            order = self._in_shard_windows(order, seed, epoch)
        if self.repeats == 1:
            return order
        # (N,) -> (N * k,): [a, a, a, b, b, b, ...] as timm's torch.repeat_interleave, then its first N
        return order.repeat_interleave(self.repeats)[:self.num_samples]

    def _in_shard_windows(self, permutation: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
        """`permutation`'s images window by window of the epoch's shard order, in the permutation's order
        within each window (a stable sort by window)."""
        shards = shard_permutation(seed, epoch, self.num_shards)
        place = torch.empty_like(shards)
        place[shards] = torch.arange(len(shards))  # each shard's place in the epoch's shard order
        windows = (place // self.window)[self.groups]  # (N,): each image's window
        return permutation[torch.sort(windows[permutation], stable=True).indices]

    def epoch_seed(self, epoch: int) -> int:
        """The seed that deals `epoch`'s order (checkpoints record it: a later mid-epoch resume keeps it)."""
        return self.earlier_seed[1] if self.earlier_seed and epoch == self.earlier_seed[0] else self.seed

    def rank_positions(self, start_step: int = 0) -> torch.Tensor:
        """Positions in the epoch's list this process reads from `start_step` to the end of an epoch, in
        reading order (micro-batches of `layout.micro_batch`)."""
        layout = self.layout
        used = torch.arange(start_step * layout.global_batch, self.steps_per_epoch * layout.global_batch)
        if self.repeats > 1:
            # (steps * G,) -> (steps, b, M) -> (steps, M, b): micro-batch m holds the step's m, m + M, ...
            used = used.view(-1, layout.micro_batch, layout.global_batch // layout.micro_batch).transpose(1, 2)
        # (steps * G,) -> (steps, accumulation, W, b): micro-batch m = micro_step * W + rank
        steps = used.reshape(-1, layout.accumulation, layout.world_size, layout.micro_batch)
        return steps[:, :, self.rank, :].reshape(-1)

    def rank_samples(self, epoch: int, start_step: int = 0) -> torch.Tensor:
        """Indices into the training list this process reads from `start_step` to the end of `epoch`, in
        reading order (micro-batches of `layout.micro_batch`)."""
        return self.epoch_order(epoch)[self.rank_positions(start_step)]

    def rank_repeats(self, start_step: int = 0) -> torch.Tensor | None:
        """Which copy of its image each of `rank_samples` is (None without repeats): its position mod k."""
        return self.rank_positions(start_step) % self.repeats if self.repeats > 1 else None
