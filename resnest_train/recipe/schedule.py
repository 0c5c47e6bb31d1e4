"""The recipe's batch and step plan, computed once: the global batch and how it is split (`BatchLayout`),
the peak lr, steps per epoch, total and warmup steps; the learning rate and DropBlock as functions of the
global step.

The global batch is the recipe's invariant (`train.global_batch`; the published ResNeSt-50 run: 8192 =
64 GPUs x 128): everything the recipe derives from the batch (lr = optim.lr x global / 256, steps per
epoch, warmup and total steps, the DropBlock ramp) comes from it, so it does not change with the number of
processes. Processes x micro-batch (`train.batch_size`) x accumulation steps = global batch. Both lr phases
update every iteration (docs/RECIPE.md; "Bag of Tricks", arXiv 1812.01187); resuming needs only the step.

The lr is computed in one place, `learning_rate` (`TrainPlan.lr`): a linear warmup from 0 over
`schedule.warmup_epochs`, then the decay `schedule.name` picks from `SCHEDULES` (cosine, step, poly, linear);
the runner sets it before every step and logs it (TensorBoard `train/lr`), so the curve is the formula.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from resnest_train.config import Config, ConfigError, ScheduleConfig


@dataclass(frozen=True)
class BatchLayout:
    """One optimizer step's images: `global_batch` = `world_size` x `micro_batch` x `accumulation`."""

    global_batch: int
    micro_batch: int
    world_size: int

    @property
    def accumulation(self) -> int:
        return self.global_batch // (self.micro_batch * self.world_size)

    @property
    def micro_batches(self) -> int:
        """Micro-batches per optimizer step, on all processes together."""
        return self.global_batch // self.micro_batch


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def resolve_layout(global_batch: int | None, micro_batch: int, world_size: int, *, even: bool = False) -> BatchLayout:
    """`global_batch` None: one micro-batch per process per step (global = micro-batch x processes).
    `even`: micro-batches must be even (batch mixup pairs the images of a micro-batch)."""
    if global_batch is None:
        return BatchLayout(micro_batch * world_size, micro_batch, world_size)
    if global_batch % (micro_batch * world_size) == 0:
        return BatchLayout(global_batch, micro_batch, world_size)
    if global_batch % world_size:
        counts = ", ".join(map(str, _divisors(global_batch)[:12]))
        raise ConfigError(f"train.global_batch={global_batch} cannot be split over {world_size} processes: no "
                          f"valid train.batch_size for {world_size} processes (process counts that divide it: "
                          f"{counts}, ...)")
    sizes = [d for d in _divisors(global_batch // world_size) if not even or d % 2 == 0]
    if not sizes:  # mixup needs even micro-batches and no even size divides the share of a process
        step = 2 * world_size
        below, above = global_batch // step * step, (global_batch // step + 1) * step
        raise ConfigError(f"train.global_batch={global_batch} gives each of {world_size} processes "
                          f"{global_batch // world_size} images, which no even train.batch_size divides (mixup or "
                          f"CutMix pairs the images of a micro-batch): use train.global_batch="
                          f"{' or '.join(str(b) for b in (below, above) if b > 0)}, or train.mixup_alpha=0 "
                          f"train.cutmix_alpha=0")
    raise ConfigError(f"train.global_batch={global_batch} is not a multiple of {world_size} processes x "
                      f"train.batch_size={micro_batch}; valid train.batch_size for {world_size} processes: "
                      f"{', '.join(map(str, sizes))}")


# Split attention normalises each micro-batch with BatchNorm: below about 16 images per process the
# statistics get noisy enough for NaN losses (the official repository's advice: >= 16 per GPU, or SyncBN).
MIN_BN_MICRO_BATCH = 16


def micro_batch_warning(micro_batch: int, *, sync_bn: bool) -> str | None:
    if micro_batch >= MIN_BN_MICRO_BATCH or sync_bn:
        return None
    return (f"train.batch_size={micro_batch} per process is below {MIN_BN_MICRO_BATCH}: BatchNorm statistics of "
            f"split attention over so few images can give NaN losses; use a micro-batch of {MIN_BN_MICRO_BATCH} "
            "or more (the global batch stays train.global_batch), or model.sync_bn=true")


@dataclass(frozen=True)
class DecayShape:
    """The lr after the warmup: `name` (a key of SCHEDULES) and the parameters of its own, in steps."""

    name: str = "cosine"
    decay_steps: float = 1.0  # step: optimizer steps between two decays (schedule.decay_epochs x steps per epoch)
    decay_rate: float = 0.1  # step: the factor at each decay
    power: float = 2.0  # poly: the exponent


COSINE = DecayShape()


def decay_shape(schedule: ScheduleConfig, steps_per_epoch: int) -> DecayShape:
    return DecayShape(schedule.name, decay_steps=schedule.decay_epochs * steps_per_epoch,
                      decay_rate=schedule.decay_rate, power=schedule.power)


def _progress(step: int, warmup_steps: int, total_steps: int) -> float:
    """0 at the end of the warmup, 1 at the last step (total_steps - 1)."""
    decay_steps = max(1, total_steps - 1 - warmup_steps)
    return min(1.0, (step - warmup_steps) / decay_steps)


def _cosine(step: int, *, total_steps: int, warmup_steps: int, peak_lr: float, min_lr: float,
            decay: DecayShape) -> float:
    """The released recipe's cosine (SGDR without restarts, arXiv 1608.03983), every iteration."""
    progress = _progress(step, warmup_steps, total_steps)
    return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def _step(step: int, *, total_steps: int, warmup_steps: int, peak_lr: float, min_lr: float,
          decay: DecayShape) -> float:
    """timm's StepLRScheduler: peak x decay_rate ** (t // decay_t), with t counted from the start of training
    (timm's create_scheduler_v2 default warmup_prefix=False: the warmup is part of the first interval) and,
    per update, t = step and decay_t = decay_epochs x steps per epoch (timm's sched_on_updates). FFCV's step
    schedule is the same rule per epoch. timm's has no floor; here the lr stays at or above min_lr."""
    return max(min_lr, peak_lr * decay.decay_rate ** (step // decay.decay_steps))


def _poly(step: int, *, total_steps: int, warmup_steps: int, peak_lr: float, min_lr: float,
          decay: DecayShape) -> float:
    """MLPerf's ResNet-50 LARS reference: TF's polynomial_decay after the warmup,
    (peak - end) x (1 - progress) ** power + end, here with end = min_lr."""
    progress = _progress(step, warmup_steps, total_steps)
    return min_lr + (peak_lr - min_lr) * (1.0 - progress) ** decay.power


def _linear(step: int, *, total_steps: int, warmup_steps: int, peak_lr: float, min_lr: float,
            decay: DecayShape) -> float:
    """FFCV's ImageNet example: after the peak a straight line down (its 'triangular' schedule, which ends at
    0 after the last epoch); here it reaches min_lr at the last step, as the cosine does."""
    progress = _progress(step, warmup_steps, total_steps)
    return min_lr + (peak_lr - min_lr) * (1.0 - progress)


SCHEDULES = {"cosine": _cosine, "step": _step, "poly": _poly, "linear": _linear}


@dataclass(frozen=True)
class TrainPlan:
    layout: BatchLayout
    peak_lr: float  # optim.lr per 256 images, scaled to the global batch
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    min_lr: float
    dropblock_prob: float
    decay: DecayShape = COSINE  # what follows the warmup (schedule.name and its own keys)

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    @property
    def global_batch(self) -> int:
        return self.layout.global_batch

    def lr(self, step: int) -> float:
        return learning_rate(step, total_steps=self.total_steps, warmup_steps=self.warmup_steps,
                             peak_lr=self.peak_lr, min_lr=self.min_lr, decay=self.decay)

    def dropblock(self, step: int) -> float:
        return self.dropblock_prob * step / self.total_steps

    def derived(self) -> dict:
        """What config.yaml records next to the config (the values a run computes from it)."""
        return {"world_size": self.world_size, "global_batch": self.global_batch,
                "micro_batch": self.layout.micro_batch, "accumulation": self.layout.accumulation,
                "lr": self.peak_lr, "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps}


def build_train_plan(config: Config, world_size: int, num_images: int) -> TrainPlan:
    """`num_images`: the training images of one epoch; its last partial global batch is dropped."""
    train = config.train
    layout = resolve_layout(train.global_batch, train.batch_size, world_size, even=train.mixing)
    steps_per_epoch = num_images // layout.global_batch
    if steps_per_epoch == 0:
        batch = (f"train.global_batch={layout.global_batch}" if train.global_batch is not None
                 else f"train.batch_size={train.batch_size} x {world_size} processes")
        fix = ("; train.global_batch=null uses train.batch_size x processes" if train.global_batch is not None
               else "; a smaller train.batch_size fits")
        raise ConfigError(f"{batch} is larger than the {num_images} training images: no full batch per epoch{fix}")
    return TrainPlan(layout=layout, peak_lr=config.optim.lr * layout.global_batch / 256,
                     steps_per_epoch=steps_per_epoch, total_steps=train.epochs * steps_per_epoch,
                     warmup_steps=round(config.schedule.warmup_epochs * steps_per_epoch),
                     min_lr=config.schedule.min_lr, dropblock_prob=config.model.dropblock_prob,
                     decay=decay_shape(config.schedule, steps_per_epoch))


def learning_rate(step: int, *, total_steps: int, warmup_steps: int, peak_lr: float, min_lr: float = 0.0,
                  decay: DecayShape = COSINE) -> float:
    """lr for the update at `step` (0-based): warmup reaches peak_lr at step == warmup_steps, then `decay`
    (cosine, linear and poly reach min_lr at the last step, total_steps - 1; step never goes below it)."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    return SCHEDULES[decay.name](step, total_steps=total_steps, warmup_steps=warmup_steps, peak_lr=peak_lr,
                                 min_lr=min_lr, decay=decay)
