"""The framework reads; backends decode. `EpochReader` owns the epoch's position for every training backend,
`MicroBatchFeed` hands DALI the encoded images of each micro-batch with their draws.

`EpochReader`: this process's micro-batches of the epoch from the step it starts at (`order.py`), how many
were delivered to the loop, the samples of the last one, and the `state()` a checkpoint stores (epoch and
optimizer step: a resumed reader starts at that step, whatever the backend). The DALI, torchvision and
synthetic training loaders hold one and only decode the micro-batches it gives them (`ReaderLoader`).

`MicroBatchFeed` is what DALI's `fn.external_source` calls: the next micro-batch's encoded bytes (a file's,
or a shard member's), its training-list positions and its augmentation draws (`draws.py`), and under
progressive resizing the epoch's crop size per image; it raises StopIteration at the end of the epoch, and is
pointed at the next epoch before the pipeline is reset, so one pipeline serves the whole run, every size.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from resnest_train.data.draws import Draws, augment_inputs, draw_batch, image_size
from resnest_train.data.order import TrainOrder
from resnest_train.data.plan import DataPlan
from resnest_train.data.sample_read import SHARDS, SampleReadError, read_sample
from resnest_train.data.samples import SampleList
from resnest_train.data.undecodable import Replacement


class EpochReader:
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
        return self.rows

    def delivered(self, samples: torch.Tensor | None) -> None:
        """A micro-batch went to the loop (None: one with no decodable image, counted all the same)."""
        self.position += 1
        if samples is not None:
            self.last_samples = samples

    def state(self) -> dict:
        step = self.start_step + self.position // self.order.layout.accumulation
        return {"order": 1, "epoch": self.epoch, "step": step}


class ReaderLoader:
    """What the training loaders share: the reader's length, epoch, position and state."""

    reader: EpochReader
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


class MicroBatchFeed:
    """`fn.external_source(source=feed, num_outputs=len(feed.names), batch=True)`: one micro-batch per call."""

    def __init__(self, plan: DataPlan, samples: SampleList, replacement: Replacement | None = None, threads: int = 4):
        self.plan, self.samples = plan, samples
        self.replacement = replacement or Replacement(len(samples))  # known undecodable samples' stand-ins
        # the outputs the graph uses: the draws of disabled augmentations are not sent
        self.names = ("encoded", "sample", "start", "shape", "flip") + ("jitter",) * (plan.color_jitter > 0) \
            + ("lighting",) * (plan.lighting > 0) + augment_inputs(plan.autoaugment) \
            + ("interp",) * (plan.crop == "inception") \
            + ("size",) * (plan.progressive_resize is not None)
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="feed")  # reads and header parses overlap
        self.epoch, self.rows, self.cursor = 0, np.zeros((0, 0), dtype=np.int64), 0
        self.repeats: np.ndarray | None = None
        # draws of the micro-batches DALI has not delivered yet, first issued first for equal samples (with
        # repeats, two micro-batches of a step can hold the same images: order.py)
        self.issued: dict[tuple, deque[Draws]] = {}
        self.error: Exception | None = None

    def point_at(self, epoch: int, rows: np.ndarray, repeats: np.ndarray | None = None) -> None:
        self.epoch, self.rows, self.repeats, self.cursor = epoch, rows, repeats, 0
        self.issued.clear()

    def _read(self, position: int) -> bytes:
        return read_sample(self.plan.root, self.samples, self.replacement.source(position))

    def sources(self, rows: np.ndarray) -> np.ndarray:
        """The positions whose images stand in for `rows` (themselves, or a known undecodable one's)."""
        return self.replacement.sources(rows)

    def __call__(self):
        if self.cursor >= len(self.rows):
            raise StopIteration
        positions = self.rows[self.cursor].tolist()
        repeats = self.repeats[self.cursor].tolist() if self.repeats is not None else None
        self.cursor += 1
        try:
            encoded = list(self.pool.map(self._read, positions))
            draws = draw_batch(self.plan, self.epoch, positions, list(self.pool.map(image_size, encoded)), repeats)
        except (OSError, ValueError, SampleReadError) as exc:  # DALI would report it without the file: kept
            self.error = exc
            raise
        self.issued.setdefault(tuple(positions), deque()).append(draws)
        return self.outputs(encoded, positions, draws)

    def outputs(self, encoded: list[bytes], positions: list[int], draws: Draws) -> tuple:
        values = {"encoded": [np.frombuffer(data, dtype=np.uint8) for data in encoded],
                  "sample": np.array(positions, dtype=np.int64).reshape(-1, 1), "start": draws.crop[:, :2].copy(),
                  "shape": draws.crop[:, 2:].copy(), "flip": draws.flip, "jitter": draws.jitter,
                  "lighting": draws.lighting, "sub_policy": draws.sub_policy, "run": draws.run, "negate": draws.negate,
                  "op": draws.op, "arg": draws.arg, "interp": draws.interp,
                  # the epoch's crop side, one float per image (DALI's resize takes float arguments)
                  "size": np.full(len(positions), self.plan.train_size(self.epoch), dtype=np.float32)}
        return tuple(values[name] for name in self.names)

    def delivered(self, positions: list[int]) -> Draws | None:
        """The draws of the micro-batch `positions`, now delivered to the loop."""
        waiting = self.issued.get(tuple(positions))
        if not waiting:
            return None
        draws = waiting.popleft()
        if not waiting:
            del self.issued[tuple(positions)]
        return draws
