"""Resuming: rank 0 reads the checkpoint, decides, and every rank learns the outcome; then one apply.

Deciding per rank from the filesystem is wrong on clusters: node-local output folders or NFS attribute
caching give ranks different checkpoints or none, and the run silently diverges (or one rank says
"complete" while the others wait). Here rank 0 alone reads the checkpoint (`checkpoint/format.py`), in two
phases that every rank learns through `agreement.rank0_acts`:
1. `found`, before the data: where the checkpoint stands (`Found`: is the run complete, what the data
   order needs);
2. `decide`, once the data and the plan are known: one `Decision` (the layout and provenance checks, where
   training continues, what changed);
then `apply` restores the model's companions on every rank: one broadcast (optimizer, GradScaler, EMA) and,
with the layout the checkpoint was taken in, one scatter of each rank's own BN statistics. The model's
weights reach every rank through DDP's broadcast of rank 0's parameters. All ranks then agree on the step.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

from resnest_train.checkpoint import provenance
from resnest_train.checkpoint.files import CheckpointError, set_rng_state
from resnest_train.checkpoint.format import Checkpoint, RankPart
from resnest_train.cluster.distributed import DistInfo, broadcast_object, scatter_object
from resnest_train.config import Config
from resnest_train.config_yaml import to_dict
from resnest_train.data.order import shuffle_record
from resnest_train.errors import UserError
from resnest_train.recipe.averaging import load_rank_buffers
from resnest_train.recipe.schedule import TrainPlan
from resnest_train.run.wrapping import unwrap

log = logging.getLogger("resnest_train")


@dataclass
class Progress:
    """Where the run is; the only mutable part of a run."""

    epoch: int = 0
    epoch_step: int = 0  # optimizer steps done in `epoch`
    step: int = 0
    best_top1: float = -1.0


@dataclass(frozen=True)
class Found:
    """Phase 1, what every rank learns before the data: where the checkpoint stands."""

    epoch: int
    epoch_step: int
    epoch_seed: int | None  # the seed that dealt the checkpoint's epoch
    owed: dict | None  # the metrics row of an epoch checkpointed before its evaluation (epoch_end.py)

    def complete(self, epochs: int) -> bool:
        return self.epoch >= epochs and self.owed is None


@dataclass(frozen=True)
class Decision:
    """Phase 2, what every rank learns once the data and the plan are known."""

    progress: Progress
    same_layout: bool  # the processes, micro- and global batch of the checkpoint: each rank's part applies
    changes: list[str]  # allowed changes (checkpoint.allow_changes), recorded in config.yaml
    order_seed: tuple[int, int] | None  # (epoch, seed) when that epoch keeps an earlier seed's order
    epoch_loss: tuple[float, int]  # mid-epoch: the epoch's loss so far (reporting)
    owed: dict | None
    fresh_optimizer: bool  # another optim.name, allowed: its state starts anew
    saved_layout: tuple[int, int | None]  # (world size, global batch) of the checkpoint


def found(checkpoint: Checkpoint | None) -> Found | None:
    if checkpoint is None:
        return None
    return Found(checkpoint.epoch, checkpoint.epoch_step, checkpoint.epoch_seed, checkpoint.epoch_metrics)


def decide(checkpoint: Checkpoint, plan: TrainPlan, current: dict, run_config: Config) -> Decision:
    """Rank 0's one decision (run through `rank0_acts`: its error, if any, is every rank's). `current`: this
    run's provenance."""
    config, allow = to_dict(run_config), run_config.checkpoint.allow_changes
    _check_layout(checkpoint, plan)
    _check_shuffle(checkpoint, config)
    changes, new_validation = _check_provenance(checkpoint, current, config, allow=allow)
    optimizer_before = checkpoint.config.get("optim", {}).get("name", "sgd")
    fresh_optimizer = optimizer_before != config["optim"]["name"]
    if fresh_optimizer:
        if not allow:
            raise CheckpointError(f"the checkpoint in {config['output_dir']} was trained with optim.name="
                                  f"{optimizer_before} (now {config['optim']['name']}): resume it with its own "
                                  "optimizer, or set checkpoint.allow_changes=true to start the new optimizer's "
                                  "state afresh")
        changes.append(f"optim.name {optimizer_before} -> {config['optim']['name']} (its state starts afresh)")
    progress = _start_progress(checkpoint, plan, new_validation=new_validation)
    _say_epochs_change(checkpoint, plan, progress)
    seed = config["train"]["seed"]
    keeps = checkpoint.epoch_step > 0 and checkpoint.epoch_seed not in (None, seed)
    return Decision(progress, _same_layout(checkpoint, plan), changes,
                    (checkpoint.epoch, checkpoint.epoch_seed) if keeps else None,
                    checkpoint.epoch_loss if progress.epoch_step > 0 else (0.0, 0), checkpoint.epoch_metrics,
                    fresh_optimizer, (checkpoint.world_size, checkpoint.global_batch))


def _check_layout(checkpoint: Checkpoint, plan: TrainPlan) -> None:
    """Mid-epoch, the rest of the epoch is the rest of its steps of `global_batch` images: any number of
    processes can take it over (the data order is dealt anew), but another global batch cannot."""
    if checkpoint.epoch_step > 0 and checkpoint.global_batch not in (None, plan.global_batch):
        raise CheckpointError(
            f"checkpoint at step {checkpoint.step} was taken mid-epoch with a global batch of "
            f"{checkpoint.global_batch}; resume it with the same global batch (train.global_batch, or "
            f"train.batch_size x processes; now {plan.global_batch})")


def _check_shuffle(checkpoint: Checkpoint, config: dict) -> None:
    """Mid-epoch, the rest of the epoch is the rest of the order its data.shuffle dealt: another shuffle or
    window would deal the epoch anew (some of its images twice, others never), so it is refused whatever
    checkpoint.allow_changes says. At an epoch boundary the next epoch is dealt the new way (logged)."""
    saved = checkpoint.epoch_shuffle
    now = shuffle_record(config["data"]["shuffle"], config["data"]["shuffle_window"])
    if saved == now:
        return
    key, old, new = (("data.shuffle", saved["shuffle"], now["shuffle"]) if saved["shuffle"] != now["shuffle"]
                     else ("data.shuffle_window", saved["window"], now["window"]))
    if checkpoint.epoch_step > 0:
        raise CheckpointError(
            f"checkpoint at step {checkpoint.step} was taken mid-epoch with {key}={old}; resume it with {key}={old} "
            f"(now {new}): its epoch's order was dealt by it, and another would use some images twice and others "
            "never; change it at an epoch boundary")
    log.info("data order from epoch %d: %s -> %s (%s)", checkpoint.epoch + 1, _said(saved), _said(now), key)


def _said(shuffle: dict) -> str:
    return shuffle["shuffle"] + (f" (windows of {shuffle['window']} shards)" if "window" in shuffle else "")


def _same_layout(checkpoint: Checkpoint, plan: TrainPlan) -> bool:
    layout = plan.layout
    return (checkpoint.world_size == layout.world_size and checkpoint.global_batch in (None, layout.global_batch)
            and checkpoint.micro_batch in (None, layout.micro_batch))


def _check_provenance(checkpoint: Checkpoint, current: dict, config: dict, *,
                      allow: bool) -> tuple[list[str], bool]:
    """Another model, other class names, another training set, other validation data or, mid-epoch, another
    seed is an error unless `allow`; every other changed key of the config is logged old -> new. Returns
    the changes allowed and whether the validation data is new."""
    if checkpoint.provenance is None:
        return [], False
    saved = checkpoint.provenance
    changes = provenance.blocking_changes(saved, current, mid_epoch=checkpoint.epoch_step > 0)
    if changes and not allow:
        raise CheckpointError(
            f"the checkpoint in {config['output_dir']} was trained on something else: {'; '.join(changes)}; "
            "resume it with its own model, data and seed, use another output_dir, or set "
            "checkpoint.allow_changes=true to continue it with the change")
    for change in provenance.config_changes(checkpoint.config, config):
        log.info("changed since the checkpoint: %s", change)
    if changes:
        log.warning("continuing with changes (checkpoint.allow_changes=true): %s", "; ".join(changes))
    return changes, provenance.validation_changed(saved, current)


def _start_progress(checkpoint: Checkpoint, plan: TrainPlan, *, new_validation: bool) -> Progress:
    """Where training continues. A checkpoint of another global batch (only at an epoch boundary: checked
    before), or of a training set of another size (checkpoint.allow_changes), places the schedule at the
    same position in the new steps per epoch. `new_validation`: the best top-1 so far, measured on other
    images, no longer chooses `best.pt`."""
    progress = Progress(checkpoint.epoch, checkpoint.epoch_step, checkpoint.step, checkpoint.best_top1)
    if new_validation and progress.best_top1 >= 0:
        log.info("best.pt is chosen anew from the next evaluation: its val top-1 %.2f was measured on the old "
                 "validation data", progress.best_top1)
        progress.best_top1 = -1.0  # none yet, as in a fresh run
    if checkpoint.global_batch not in (None, plan.global_batch) or \
            checkpoint.steps_per_epoch not in (None, plan.steps_per_epoch):
        progress.epoch_step = min(progress.epoch_step, plan.steps_per_epoch)
        progress.step = progress.epoch * plan.steps_per_epoch + progress.epoch_step
    return progress


def _say_epochs_change(checkpoint: Checkpoint, plan: TrainPlan, progress: Progress) -> None:
    """A changed train.epochs stretches or shortens the schedule: say what it does to the next step's lr."""
    epochs = checkpoint.trained_epochs
    if epochs * plan.steps_per_epoch == plan.total_steps:
        return
    before = dataclasses.replace(plan, total_steps=epochs * plan.steps_per_epoch).lr(progress.step)
    log.warning("train.epochs %d -> %d: the schedule now ends at step %d (was %d); lr at the next step %g -> %g",
                epochs, plan.total_steps // plan.steps_per_epoch, plan.total_steps, epochs * plan.steps_per_epoch,
                before, plan.lr(progress.step))


def apply(run, checkpoint: Checkpoint | None, decision: Decision) -> None:
    """Every rank: the optimizer, GradScaler and EMA states from rank 0's checkpoint (one broadcast), each
    rank's own BN statistics when the layout is the checkpoint's (one scatter), then the step agreed on.
    `run` is the runner's `Run` (its model already holds rank 0's weights, through DDP)."""
    shared = broadcast_object(_shared_part(checkpoint, decision) if run.dist.is_main else None, run.dist)
    if shared["optimizer"] is not None:
        run.optimizer.load_state_dict(shared["optimizer"])
    if shared["scaler"]:  # empty when the checkpoint's run did not use fp16
        run.scaler.load_state_dict(shared["scaler"])
    if run.ema is not None:
        if shared["ema"] is None:
            log.warning("train.ema=%g starts at this resume, from the current weights (the checkpoint has no "
                        "EMA)", run.ema.decay)
        else:
            run.ema.load_state_dict(shared["ema"])
    if decision.same_layout:
        mine = RankPart.from_state(scatter_object([p.to_state() | _rng(p) for p in checkpoint.ranks]
                                                  if run.dist.is_main else None, run.dist))
        _apply_rank_part(run, mine)
    _say_layout_change(run, decision)
    _check_agreement(decision.progress.step, run.dist)


def _shared_part(checkpoint: Checkpoint, decision: Decision) -> dict:
    return {"optimizer": None if decision.fresh_optimizer else checkpoint.optimizer, "scaler": checkpoint.scaler,
            "ema": checkpoint.ema}


def _rng(part: RankPart) -> dict:
    return {"rng": part.rng} if part.rng is not None else {}


def _apply_rank_part(run, mine: RankPart) -> None:
    load_rank_buffers(unwrap(run.model), mine.buffers)
    if run.ema is not None and mine.ema_buffers is not None:
        load_rank_buffers(run.ema.module, mine.ema_buffers)
    if mine.rng is not None:  # format-1 checkpoints written before randomness was seeded per step and sample
        set_rng_state(mine.rng)


def _say_layout_change(run, decision: Decision) -> None:
    world_size, global_batch = decision.saved_layout
    if world_size != run.dist.world_size or global_batch != run.plan.global_batch:
        progress = decision.progress
        log.warning("resuming a run of world size %d (global batch %s) with world size %d (global batch %d) at "
                    "epoch %d, step %d of %d", world_size, global_batch, run.dist.world_size,
                    run.plan.global_batch, progress.epoch, progress.epoch_step, run.plan.steps_per_epoch)


def _check_agreement(step: int, dist: DistInfo) -> None:
    if not dist.distributed:
        return
    steps = [None] * dist.world_size
    torch.distributed.all_gather_object(steps, step)
    if len(set(steps)) > 1:
        raise UserError(f"ranks restored different steps {steps}; the checkpoint state did not reach every rank")
