"""Building a run, once, in the order its decisions need: the run folder and the checkpoint (rank 0; every
rank learns where it stands), the data and the plan, rank 0's resume decision, the loaders, the parts a run
trains with, and the resume applied. Returns the `Run` the loop reads and the `Progress` it advances."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass

from torch import nn

from resnest_train.checkpoint.provenance import provenance
from resnest_train.checkpoint.writer import CheckpointWriter
from resnest_train.cluster.agreement import rank0_acts
from resnest_train.cluster.distributed import DistInfo
from resnest_train.config import Config
from resnest_train.data import (
    DataPlan,
    TrainLoader,
    TrainOrder,
    ValLoader,
    build_data_plan,
    build_train_loader,
    build_val_loader,
    check_classes,
    known_undecodable,
    load_dataset_index,
    num_train_images,
    shard_groups,
)
from resnest_train.recipe.schedule import TrainPlan, build_train_plan, micro_batch_warning
from resnest_train.run import resume
from resnest_train.run.parts import Parts, build_parts
from resnest_train.run.reporting import start_summary
from resnest_train.run.run_folder import prepare_run_folder, write_resolved_config
from resnest_train.run.wrapping import build_model

log = logging.getLogger("resnest_train")


@dataclass(frozen=True)
class Run(Parts):
    """Everything the loop needs (the `Parts` and what the data and the resume decided); what changes
    lives in `Progress`."""

    config: Config
    dist: DistInfo
    plan: TrainPlan
    data: DataPlan
    order: TrainOrder
    train_loader: TrainLoader
    val_loader: ValLoader
    writer: CheckpointWriter | None  # rank 0's background checkpoint writer
    provenance: dict  # what this run trains on (provenance.py), stored in every checkpoint
    changes: list[str]  # what changed since the checkpoint resumed, with checkpoint.allow_changes=true
    summary: list[str]  # the start-up summary's lines
    resumed_loss: tuple[float, int]  # the resumed epoch's loss before its checkpoint (RunReporter)
    owed: dict | None  # the metrics row of the epoch the checkpoint ended but did not evaluate (epoch_end.py)


def prepare(config: Config, dist: DistInfo, stack: contextlib.ExitStack) -> tuple[Run, resume.Progress] | None:
    """The run, or None when the run folder holds a finished run."""
    model = build_model(config.model, pretrained=False)
    checkpoint, found = _find(config, model, dist, stack)
    if found is not None and found.complete(config.train.epochs):
        log.info("run in %s is already complete (%d epochs); nothing to do", config.output_dir, found.epoch)
        return None
    data = build_data_plan(config, dist)
    index = load_dataset_index(data, dist)
    check_classes(index, config.model.num_classes, config.data.root)
    groups = shard_groups(config.data.shuffle, index, config.data.root)
    num_images = num_train_images(data, index)
    plan = build_train_plan(config, dist.world_size, num_images)
    if dist.is_main and (warning := micro_batch_warning(config.train.batch_size, sync_bn=config.model.sync_bn)):
        log.warning(warning)
    trained_on = provenance(config, index.classes if index else None, index.train if index else None,
                            index.val if index else None, plan.global_batch)
    decision = rank0_acts(lambda: resume.decide(checkpoint, plan, trained_on, config), dist) \
        if found is not None else None
    progress = decision.progress if decision is not None else resume.Progress()
    order = TrainOrder(config.train.seed, num_images, plan.layout, plan.steps_per_epoch, dist.rank,
                       decision.order_seed if decision else None, repeats=config.train.repeated_augment,
                       groups=groups, window=config.data.shuffle_window)
    train_loader, val_loader = _loaders(config, data, index, order, progress, dist, stack)
    # Closed (the write in flight finished) whatever ends the run; rank 0 alone writes.
    writer = stack.enter_context(CheckpointWriter(config.output_dir, keep_last=config.checkpoint.keep_last)) \
        if dist.is_main else None
    parts = build_parts(config, model, plan, dist)
    run = Run(**{field.name: getattr(parts, field.name) for field in dataclasses.fields(Parts)},
              config=config, dist=dist, plan=plan, data=data, order=order, train_loader=train_loader,
              val_loader=val_loader, writer=writer, provenance=trained_on,
              changes=decision.changes if decision else [],
              summary=start_summary(dist, data, index, plan, decision.saved_layout[0] if decision else None,
                                    progress, order),
              resumed_loss=decision.epoch_loss if decision else (0.0, 0), owed=decision.owed if decision else None)
    if decision is not None:
        resume.apply(run, checkpoint, decision)
    rank0_acts(lambda: _record_start(run, progress), dist)
    return run, progress


def _find(config: Config, model: nn.Module, dist: DistInfo, stack: contextlib.ExitStack):
    """Phase 1 of resuming: rank 0 prepares the run folder, reads the checkpoint and loads its weights into
    `model`; every rank learns where it stands. The checkpoint itself stays on rank 0 (None elsewhere)."""
    kept = {}

    def find() -> resume.Found | None:
        kept["checkpoint"] = prepare_run_folder(config, model, stack)
        return resume.found(kept["checkpoint"])

    found = rank0_acts(find, dist)
    return kept.get("checkpoint"), found


def _record_start(run: Run, progress: resume.Progress) -> None:
    """Rank 0: config.yaml of this run, and metrics.jsonl cut back to where it continues."""
    evaluated = progress.epoch - 1 if run.owed is not None else None  # the owed evaluation writes its row again
    write_resolved_config(run.config, run.plan.derived(), progress.epoch, run.changes, evaluated=evaluated)


def _loaders(config: Config, data: DataPlan, index, order: TrainOrder, progress: resume.Progress, dist: DistInfo,
             stack: contextlib.ExitStack) -> tuple[TrainLoader, ValLoader]:
    """The training loader from where the run starts and the validation loader, without the images the
    run folder records as undecodable; closed (their workers ended) whatever ends the run."""
    undecodable = known_undecodable(index, config.output_dir, dist)
    train_loader = build_train_loader(data, index, order, start=(progress.epoch, progress.epoch_step),
                                      undecodable=undecodable.get("train", []))
    stack.callback(train_loader.close)
    val_loader = build_val_loader(data, index, batch_size=config.train.batch_size,
                                  undecodable=undecodable.get("val", []))
    stack.callback(val_loader.close)
    return train_loader, val_loader
