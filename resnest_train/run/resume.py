"""One state for every rank: rank 0 reads the checkpoint (no other rank needs the file), decides, and
sends each rank what it needs.

Deciding per rank from the filesystem is wrong on clusters: node-local output folders or NFS attribute
caching give ranks different checkpoints or none, and the run silently diverges (or one rank says
"complete" while the others wait). Here rank 0 alone finds the state; the others receive its summary
(epoch, step, position, world size, global and micro-batch) and so reach the same decisions; the model reaches them
through DDP's broadcast of rank 0's parameters, the optimizer state by broadcast, and each rank's own RNG
and data position by scatter. After restoring, all ranks must agree on the step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from resnest_train.checkpoint import files as ckpt
from resnest_train.checkpoint import provenance
from resnest_train.cluster.agreement import rank0_acts
from resnest_train.cluster.distributed import DistInfo, broadcast_object, scatter_object
from resnest_train.errors import UserError
from resnest_train.recipe.schedule import BatchLayout, TrainPlan, learning_rate

log = logging.getLogger("resnest_train")

SUMMARY = ("epoch", "batch", "step", "world_size", "global_batch", "micro_batch", "steps_per_epoch", "best_top1",
           "scaler", "epoch_loss", "epoch_metrics")


@dataclass
class Progress:
    """Where the run is; the only mutable part of a run."""

    epoch: int = 0
    batch: int = 0  # optimizer steps done in `epoch`
    step: int = 0
    best_top1: float = -1.0


@dataclass(frozen=True)
class ResumeSummary:
    """The part of the resume state every rank receives (the model goes through DDP, not through here)."""

    epoch: int
    batch: int
    step: int
    world_size: int
    global_batch: int | None
    best_top1: float
    scaler: dict = field(default_factory=dict)
    micro_batch: int | None = None  # None: a checkpoint written before accumulation existed
    steps_per_epoch: int | None = None
    seed: int | None = None  # the seed that dealt the checkpoint's epoch (train.seed, or an earlier one)
    epoch_loss: tuple[float, int] = (0.0, 0)  # the epoch's loss before the checkpoint (reporting.RunReporter)
    # at an epoch's end, checkpointed before its evaluation: the epoch's metrics row so far, the evaluation
    # this run owes first (epoch_end.py); None when evaluated (or not due), and in checkpoints written before
    epoch_metrics: dict | None = None

    def epoch_seed(self, seed: int) -> tuple[int, int] | None:
        """(epoch, seed) when the epoch resumed mid-way was dealt by another seed than `seed` (allowed by
        checkpoint.allow_changes): the rest of that epoch keeps its order."""
        if self.batch > 0 and self.seed is not None and self.seed != seed:
            return self.epoch, self.seed
        return None


def summarize(state: dict | None) -> ResumeSummary | None:
    """The part of rank 0's resume state every rank receives (through `agreement.rank0_acts`)."""
    if state is None:
        return None
    # the seed that dealt the checkpoint's epoch: the run's, or an earlier one kept by an allowed change
    seed = state.get("epoch_seed", state.get("config", {}).get("train", {}).get("seed"))
    return ResumeSummary(**{key: state.get(key) for key in SUMMARY if key in state}, seed=seed)


def check_layout(summary: ResumeSummary, layout: BatchLayout) -> None:
    """Mid-epoch, the rest of the epoch is the rest of its steps of `global_batch` images: any number of
    processes can take it over (the data order is dealt anew), but another global batch cannot."""
    if summary.batch == 0:
        return
    if summary.global_batch is not None and summary.global_batch != layout.global_batch:
        raise ckpt.CheckpointError(
            f"checkpoint at step {summary.step} was taken mid-epoch with a global batch of "
            f"{summary.global_batch}; resume it with the same global batch (train.global_batch, or "
            f"train.batch_size x processes; now {layout.global_batch})")


def same_layout(summary: ResumeSummary, layout: BatchLayout) -> bool:
    """Saved with these processes, micro-batch and global batch: each rank's own state applies again."""
    return (summary.world_size == layout.world_size and summary.global_batch in (None, layout.global_batch)
            and summary.micro_batch in (None, layout.micro_batch))


def rank_states(state: dict | None, summary: ResumeSummary | None, dist: DistInfo, layout: BatchLayout) -> dict:
    """This rank's RNG and data position, when the layout is the one they were saved in."""
    if summary is None or not same_layout(summary, layout):
        return {}
    return scatter_object(state["ranks"] if dist.is_main else None, dist)


def check_provenance(state: dict | None, current: dict, config: dict, *, allow: bool,
                     dist: DistInfo) -> tuple[list[str], bool]:
    """Rank 0 compares what the checkpoint was trained on with this run (provenance.py); another model,
    other class names, another training set, other validation data or, mid-epoch, another seed is an error
    on every rank unless `allow`. Every other changed key of the config (`config`: this run's, resolved) is
    logged old -> new. Returns the changes allowed (to be recorded) and whether the validation data is new
    (the best top-1 so far is then of other images: `start_progress` forgets it)."""
    def compare() -> tuple[list[str], bool]:
        if state is None or "provenance" not in state:
            return [], False
        changes = provenance.blocking_changes(state["provenance"], current, mid_epoch=state["batch"] > 0)
        if changes and not allow:
            raise ckpt.CheckpointError(
                f"the checkpoint in {config['output_dir']} was trained on something else: {'; '.join(changes)}; "
                "resume it with its own model, data and seed, use another output_dir, or set "
                "checkpoint.allow_changes=true to continue it with the change")
        for change in provenance.config_changes(state["config"], config):
            log.info("changed since the checkpoint: %s", change)
        if changes:
            log.warning("continuing with changes (checkpoint.allow_changes=true): %s", "; ".join(changes))
        return changes, provenance.validation_changed(state["provenance"], current)

    return rank0_acts(compare, dist)


def restore_optimizer(optimizer: torch.optim.Optimizer, state: dict | None, dist: DistInfo) -> None:
    optimizer.load_state_dict(broadcast_object(state["optimizer"] if dist.is_main else None, dist))


def check_agreement(step: int, dist: DistInfo) -> None:
    if not dist.distributed:
        return
    steps = [None] * dist.world_size
    torch.distributed.all_gather_object(steps, step)
    if len(set(steps)) > 1:
        raise UserError(f"ranks restored different steps {steps}; the checkpoint state did not reach every rank")


def say_epochs_change(state: dict, plan: TrainPlan, progress: Progress) -> None:
    """A changed train.epochs stretches or shortens the cosine: say what it does to the next step's lr."""
    epochs = state["config"]["train"]["epochs"]
    if epochs * plan.steps_per_epoch == plan.total_steps:
        return
    before = learning_rate(progress.step, total_steps=epochs * plan.steps_per_epoch, warmup_steps=plan.warmup_steps,
                           peak_lr=plan.peak_lr, min_lr=plan.min_lr)
    log.warning("train.epochs %d -> %d: the schedule now ends at step %d (was %d); lr at the next step %g -> %g",
                epochs, plan.total_steps // plan.steps_per_epoch, plan.total_steps, epochs * plan.steps_per_epoch,
                before, plan.lr(progress.step))


def start_progress(summary: ResumeSummary | None, plan: TrainPlan, *, new_validation: bool = False) -> Progress:
    """Where training continues. A checkpoint of another global batch (only at an epoch boundary: checked
    before), or of a training set of another size (checkpoint.allow_changes), places the schedule at the
    same position in the new steps per epoch. `new_validation`: the validation data changed (allowed), so
    the best top-1 so far, measured on other images, no longer chooses `best.pt`."""
    if summary is None:
        return Progress()
    progress = Progress(summary.epoch, summary.batch, summary.step, summary.best_top1)
    if new_validation and progress.best_top1 >= 0:
        log.info("best.pt is chosen anew from the next evaluation: its val top-1 %.2f was measured on the old "
                 "validation data", progress.best_top1)
        progress.best_top1 = -1.0  # none yet, as in a fresh run
    if (summary.global_batch is not None and summary.global_batch != plan.global_batch) or \
            summary.steps_per_epoch not in (None, plan.steps_per_epoch):
        progress.batch = min(progress.batch, plan.steps_per_epoch)
        progress.step = progress.epoch * plan.steps_per_epoch + progress.batch
    return progress
