"""`MicroBatchFeed`, what DALI's `fn.external_source` calls: the next micro-batch's encoded bytes (a file's,
or a shard member's), its training-list positions and its augmentation draws (`draws.py`), and under
progressive resizing the epoch's crop size per image; it raises StopIteration at the end of the epoch, and is
pointed at the next epoch before the pipeline is reset, so one pipeline serves the whole run, every size.
Plain Python and numpy (no DALI import): the tests inspect it without a pipeline.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from resnest_train.data.draws import Draws, augment_inputs, draw_batch, image_size
from resnest_train.data.plan import DataPlan
from resnest_train.data.sample_read import SampleReadError, read_sample
from resnest_train.data.samples import SampleList
from resnest_train.data.undecodable import Replacement


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
