"""When each shard is read next (shard_cache.py's eviction and prefetch): the node's future, known in advance.

Epoch e's order is a function of (seed, e) (order.py): for every shard, the steps of this epoch and the next
that read it. Validation shards are read at every epoch's end.
"""

from __future__ import annotations

import numpy as np

NEVER = float("inf")


class NextUse:
    """When each shard is read next, in steps from the run's start (epoch x steps + step)."""

    def __init__(self, units: list[str]):
        self.ids = {unit: i for i, unit in enumerate(units)}
        self.times: list[np.ndarray] = [np.zeros(0) for _ in units]
        self.steps_per_epoch = 0

    def plan(self, spans: list[tuple[int, np.ndarray]], steps_per_epoch: int, global_batch: int) -> None:
        """`spans`: (first step, the shard id of each position read from it on, `global_batch` per step)."""
        self.steps_per_epoch = steps_per_epoch
        keys = []
        for first_step, ids in spans:
            steps = first_step + np.arange(len(ids)) // global_batch
            keys.append(ids.astype(np.int64) * (1 << 32) + steps)
        keys = np.unique(np.concatenate(keys)) if keys else np.zeros(0, np.int64)
        units, steps = keys >> 32, keys & ((1 << 32) - 1)
        bounds = np.searchsorted(units, np.arange(len(self.times) + 1))
        self.times = [steps[bounds[i]:bounds[i + 1]] for i in range(len(self.times))]

    def next(self, unit: str, now: float) -> float:
        if unit.startswith("val/"):  # evaluation reads every validation shard at each epoch's end
            return -(-now // self.steps_per_epoch) * self.steps_per_epoch if self.steps_per_epoch else now
        times = self.times[self.ids[unit]] if unit in self.ids else ()
        i = np.searchsorted(times, now) if len(times) else 0
        return float(times[i]) if i < len(times) else NEVER

    def coming(self, now: float, count: int) -> list[str]:
        """The first `count` shards read from `now` on, soonest first."""
        nexts = [(self.next(unit, now), unit) for unit in self.ids]
        return [unit for when, unit in sorted(nexts) if when < NEVER][:count]
