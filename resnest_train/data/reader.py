"""The framework reads; backends decode. `EpochCursor` owns the epoch's position for every training backend.

`EpochCursor`: this process's micro-batches of the epoch from the step it starts at (`order.py`), how many
were delivered to the loop, the samples of the last one, and the `state()` a checkpoint stores (epoch and
optimizer step: a resumed reader starts at that step, whatever the backend). The DALI, torchvision and
synthetic training loaders hold one and only decode the micro-batches it gives them (`ReaderLoader`); DALI
receives them through `dali_feed.MicroBatchFeed`.
"""

from __future__ import annotations

import numpy as np
import torch

from resnest_train.data.order import TrainOrder
from resnest_train.data.sample_read import SHARDS
from resnest_train.data.shard_caches import epoch_started, step_reached


class EpochCursor:
    """This process's position in the framework's data order."""

    def __init__(self, order: TrainOrder, start: tuple[int, int] = (0, 0)):
        self.order, self.start = order, start  # start: (epoch, optimizer steps done in it)
        self.epoch, self.start_step, self.position = start[0], start[1], 0
        self.rows = np.zeros((0, order.layout.micro_batch), dtype=np.int64)
        self.repeats: np.ndarray | None = None  # each row entry's copy of its image (train.repeated_augment)
        self.last_samples = torch.empty(0, dtype=torch.long)

    def __len__(self) -> int:
        return self.order.micro_batches_per_epoch

    def set_epoch(self, epoch: int) -> np.ndarray:
        """The micro-batches (rows of training-list positions) this process reads in `epoch`, from the step
        the run starts at when it is the first epoch."""
        self.start_step = self.start[1] if epoch == self.start[0] else 0
        self.epoch, self.position = epoch, 0
        samples = self.order.rank_samples(epoch, self.start_step)
        self.rows = samples.view(-1, self.order.layout.micro_batch).numpy()
        repeats = self.order.rank_repeats(self.start_step)
        self.repeats = repeats.view(self.rows.shape).numpy() if repeats is not None else None
        epoch_started(epoch, self.start_step)  # a remote root's cache plans its fetches and evictions
        return self.rows

    def delivered(self, samples: torch.Tensor | None) -> None:
        """A micro-batch went to the loop (None: one with no decodable image, counted all the same)."""
        self.position += 1
        if samples is not None:
            self.last_samples = samples
        if self.position % self.order.layout.accumulation == 0:
            step_reached(self.epoch, self.start_step + self.position // self.order.layout.accumulation)

    def state(self) -> dict:
        step = self.start_step + self.position // self.order.layout.accumulation
        return {"order": 1, "epoch": self.epoch, "step": step}


class ReaderLoader:
    """What the training loaders share: the reader's length, epoch, position and state."""

    reader: EpochCursor
    last_draws = None  # the draws of the micro-batch last yielded, where the backend augments

    def __len__(self) -> int:
        return len(self.reader)

    @property
    def last_samples(self) -> torch.Tensor:
        return self.reader.last_samples

    def state(self) -> dict:
        return self.reader.state()

    def close(self) -> None:
        """Release the backend's workers (a DataLoader's processes) and the shard descriptors; the loader is
        not used after."""
        SHARDS.close()

    def newly_undecodable(self) -> list[str]:
        """Training images found undecodable (and replaced) since the last call, relative to data.root: rank 0
        records them at the next checkpoint (undecodable.py)."""
        return []
