"""When each shard is read next (shard_cache.py's eviction and prefetch): the node's future, known in advance.

Epoch e's order is a function of (seed, e) (order.py): for every shard, the steps of this epoch and the next
that read it. Validation shards are read at every epoch's end.
"""

from __future__ import annotations

import numpy as np

NEVER = float("inf")


class NextUse:
    """When each shard is read next, in steps from the run's start (epoch x steps + step); the images of a
    step are spread over it (image i of a global batch of G at step + i / G), so the shards a step reads are
    ranked by where in it they are read."""

    def __init__(self, units: list[str]):
        self.names = list(units)
        self.ids = {unit: i for i, unit in enumerate(units)}
        self.times: list[np.ndarray] = [np.zeros(0) for _ in units]
        self.steps_per_epoch = 0
        # every planned read, by time: the shards read next from any step (`coming`, asked at each step)
        self.flat_times, self.flat_units = np.zeros(0), np.zeros(0, np.int64)

    def plan(self, spans: list[tuple[int, np.ndarray]], steps_per_epoch: int, global_batch: int) -> None:
        """`spans`: (first step, the shard id of each position read from it on, `global_batch` per step)."""
        self.steps_per_epoch = steps_per_epoch
        units, slots = [], []
        for first_step, ids in spans:
            units.append(ids.astype(np.int64))
            slots.append(first_step * global_batch + np.arange(len(ids), dtype=np.int64))
        units = np.concatenate(units) if units else np.zeros(0, np.int64)
        slots = np.concatenate(slots) if slots else np.zeros(0, np.int64)
        order = np.lexsort((slots, units))  # by shard, then by time
        units, times = units[order], slots[order] / global_batch
        bounds = np.searchsorted(units, np.arange(len(self.times) + 1))
        self.times = [times[bounds[i]:bounds[i + 1]] for i in range(len(self.times))]
        by_time = np.argsort(times, kind="stable")
        self.flat_times, self.flat_units = times[by_time], units[by_time]

    def next(self, unit: str, now: float, evaluating: bool = False) -> float:
        """The step at which `unit` is read next from `now` (NEVER: not in the two epochs planned). A
        validation shard is read now during an evaluation, else at the end of the epoch."""
        if unit.startswith("val/"):
            if evaluating or not self.steps_per_epoch:
                return now
            return (now // self.steps_per_epoch + 1) * self.steps_per_epoch
        times = self.times[self.ids[unit]] if unit in self.ids else ()
        i = np.searchsorted(times, now) if len(times) else 0
        return float(times[i]) if i < len(times) else NEVER

    def coming(self, now: float, count: int, evaluating: bool = False) -> list[str]:
        """The first `count` shards read from `now` on, soonest first (validation shards only during an
        evaluation: they are not fetched ahead of the epoch's end)."""
        chosen = dict.fromkeys(unit for unit in self.names if evaluating and unit.startswith("val/"))
        i = int(np.searchsorted(self.flat_times, now))
        while len(chosen) < count and i < len(self.flat_units):
            for unit in self.flat_units[i:i + 4 * count].tolist():  # the reads from `now` on, a few at a time
                chosen.setdefault(self.names[unit])
            i += 4 * count
        return list(chosen)[:count]
