"""The run's step plan (global batch, peak lr, steps per epoch, total and warmup steps), computed once,
and the learning rate as a pure function of the global step: linear warmup from 0, then cosine to min_lr.

Both phases update every iteration (the ResNeSt recipe, docs/RECIPE.md; "Bag of Tricks", arXiv
1812.01187). Resuming needs only the step, nothing else. DropBlock's probability ramps linearly from 0 to
its target over the whole run, also by step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from resnest_train.config import Config


@dataclass(frozen=True)
class TrainPlan:
    world_size: int
    global_batch: int
    peak_lr: float  # optim.lr per 256 images, scaled to the global batch
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    min_lr: float
    dropblock_prob: float

    def lr(self, step: int) -> float:
        return learning_rate(step, total_steps=self.total_steps, warmup_steps=self.warmup_steps,
                             peak_lr=self.peak_lr, min_lr=self.min_lr)

    def dropblock(self, step: int) -> float:
        return self.dropblock_prob * step / self.total_steps

    def derived(self) -> dict:
        """What config.yaml records next to the config (the values a run computes from it)."""
        return {"world_size": self.world_size, "global_batch": self.global_batch, "lr": self.peak_lr,
                "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps}


def build_train_plan(config: Config, world_size: int, steps_per_epoch: int) -> TrainPlan:
    global_batch = config.train.batch_size * world_size
    return TrainPlan(world_size=world_size, global_batch=global_batch,
                     peak_lr=config.optim.lr * global_batch / 256, steps_per_epoch=steps_per_epoch,
                     total_steps=config.train.epochs * steps_per_epoch,
                     warmup_steps=round(config.schedule.warmup_epochs * steps_per_epoch),
                     min_lr=config.schedule.min_lr, dropblock_prob=config.model.dropblock_prob)


def learning_rate(step: int, *, total_steps: int, warmup_steps: int, peak_lr: float, min_lr: float = 0.0) -> float:
    """lr for the update at `step` (0-based): warmup reaches peak_lr at step == warmup_steps, and the
    cosine reaches min_lr at the last step (total_steps - 1)."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    decay_steps = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
