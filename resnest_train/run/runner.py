"""The training run: builds everything once, restores one state on every rank, owns the epoch loop.

Read top to bottom: `train()` sets up the process group, `_prepare()` builds the model, lets rank 0 decide
what to resume (resume.py), builds data, plan, optimizer and wrappers, and writes `config.yaml`; `_fit()`
runs epochs of steps, evaluates, checkpoints and reports. Rank 0 alone touches the run folder; every rank
takes part in the collectives (resume state, evaluation counts, checkpoint state, stop requests).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from resnest_train.checkpoint import files as ckpt
from resnest_train.checkpoint.provenance import provenance
from resnest_train.checkpoint.writer import CheckpointWriter
from resnest_train.cluster.agreement import rank0_acts, stop_every_rank
from resnest_train.cluster.distributed import DistInfo, cleanup, setup_distributed
from resnest_train.cluster.process import cpu_speed_settings, seed_everything, stop_signals
from resnest_train.config import Config
from resnest_train.config_yaml import to_dict
from resnest_train.data import (
    DataPlan,
    TrainLoader,
    TrainOrder,
    ValLoader,
    build_data_plan,
    build_train_loader,
    build_val_loader,
    known_undecodable,
    load_dataset_index,
    num_train_images,
)
from resnest_train.data.undecodable import add_to_record
from resnest_train.errors import UserError
from resnest_train.recipe.averaging import WeightEma, build_ema, distribute_bn, restore_averages
from resnest_train.recipe.engine import Precision, forward_backward, optimizer_step, resolve_precision, validate
from resnest_train.recipe.loss import build_criterion, build_mixup
from resnest_train.recipe.mixing import BatchMix
from resnest_train.recipe.optim import build_optimizer
from resnest_train.recipe.randomness import micro_batch_generator, seed_micro_batch
from resnest_train.recipe.schedule import TrainPlan, build_train_plan, micro_batch_warning
from resnest_train.run import resume
from resnest_train.run.reporting import RunReporter, SampleRecord, configure_logging, start_summary
from resnest_train.run.resume import Progress
from resnest_train.run.run_folder import prepare_run_folder, write_resolved_config
from resnest_train.run.saving import save, wait_for_writes
from resnest_train.run.wrapping import build_model, place, train_mode, unwrap, wrap_for_training

log = logging.getLogger("resnest_train")


@dataclass(frozen=True)
class Run:
    """Everything the loop needs, built once by `_prepare`; what changes lives in `Progress`."""

    config: Config
    dist: DistInfo
    plan: TrainPlan
    data: DataPlan
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    mixup: BatchMix | None  # mixup and/or CutMix (train.mixup_alpha, train.cutmix_alpha)
    precision: Precision
    order: TrainOrder
    train_loader: TrainLoader
    val_loader: ValLoader
    writer: CheckpointWriter | None  # rank 0's background checkpoint writer
    provenance: dict  # what this run trains on (provenance.py), stored in every checkpoint
    changes: list[str]  # what changed since the checkpoint resumed, with checkpoint.allow_changes=true
    summary: list[str]  # the start-up summary's lines
    resumed_loss: tuple[float, int]  # the resumed epoch's loss before its checkpoint (RunReporter)
    ema: WeightEma | None  # the weight EMA (train.ema > 0)


def train(config: Config) -> Path:
    """Train `config` to completion (or until a stop signal); return the run folder."""
    dist = setup_distributed(config.train.device)
    configure_logging(dist)
    try:
        with contextlib.ExitStack() as stack:
            # From the start: a stop signal during setup is kept and honoured at the first step.
            stop = stack.enter_context(stop_signals())
            prepared = _prepare(config, dist, stack)
            if prepared is not None:
                _fit(*prepared, stop)
        return Path(config.output_dir)
    except Exception as exc:  # noqa: BLE001 - every failure ends every rank the same way
        raise stop_every_rank(exc, dist, record=lambda files: add_to_record(config.output_dir, files)) \
            from None
    finally:
        cleanup(dist)


def _prepare(config: Config, dist: DistInfo, stack: contextlib.ExitStack) -> tuple[Run, Progress] | None:
    train_cfg = config.train
    seed_everything(train_cfg.seed + dist.rank, train_cfg.deterministic)
    cpu_speed_settings(dist.device)
    model = build_model(config.model, pretrained=False)
    summary, state = _decide_resume(config, model, dist, stack)
    if summary is not None and summary.epoch >= train_cfg.epochs:
        log.info("run in %s is already complete (%d epochs); nothing to do", config.output_dir, summary.epoch)
        return None
    data = build_data_plan(config, dist)
    index = load_dataset_index(data, dist)
    _check_classes(index, config)
    num_images = num_train_images(data, index)
    plan = build_train_plan(config, dist.world_size, num_images)
    if dist.is_main and (warning := micro_batch_warning(train_cfg.batch_size, sync_bn=config.model.sync_bn)):
        log.warning(warning)
    if summary is not None:
        resume.check_layout(summary, plan.layout)
    trained_on = provenance(config, index.classes if index else None, index.train if index else None,
                            plan.global_batch)
    changes = resume.check_provenance(state, trained_on, to_dict(config), allow=config.checkpoint.allow_changes,
                                      dist=dist)
    rank_state = resume.rank_states(state, summary, dist, plan.layout)
    progress = resume.start_progress(summary, plan)
    order = TrainOrder(train_cfg.seed, num_images, plan.layout, plan.steps_per_epoch, dist.rank,
                       summary.epoch_seed(train_cfg.seed) if summary else None)
    train_loader, val_loader = _loaders(config, data, index, order, progress, rank_state, dist, stack)
    # DDP's constructor broadcasts rank 0's parameters and buffers: the weights rank 0 loaded reach all.
    model = wrap_for_training(place(model, dist, channels_last=train_cfg.channels_last), dist,
                              sync_bn=config.model.sync_bn, compile_model=train_cfg.compile,
                              accumulation=plan.layout.accumulation)
    precision = resolve_precision(train_cfg.amp, dist.device)
    optimizer = build_optimizer(unwrap(model), config.optim, plan.peak_lr)
    scaler = torch.amp.GradScaler(dist.device.type, enabled=precision.needs_scaler)
    # Closed (the write in flight finished) whatever ends the run; rank 0 alone writes.
    writer = stack.enter_context(CheckpointWriter(config.output_dir, keep_last=config.checkpoint.keep_last)) \
        if dist.is_main else None
    run = Run(config, dist, plan, data, model, optimizer, scaler, build_criterion(train_cfg),
              build_mixup(train_cfg, config.model.num_classes), precision, order, train_loader, val_loader, writer,
              trained_on, changes, start_summary(config, dist, data, index, plan, summary, progress),
              tuple(summary.epoch_loss or (0.0, 0)) if summary is not None and progress.batch > 0 else (0.0, 0),
              build_ema(unwrap(model), train_cfg.ema, warmup=train_cfg.ema_warmup, device_setting=train_cfg.ema_device,
                        device=dist.device))
    if summary is not None:
        _restore(run, state, summary, rank_state, progress)
    rank0_acts(lambda: _record_start(config, plan, progress, changes, state), dist)
    return run, progress


def _decide_resume(config: Config, model: nn.Module, dist: DistInfo,
                   stack: contextlib.ExitStack) -> tuple[resume.ResumeSummary | None, dict | None]:
    """Rank 0 prepares the run folder and finds the state to resume; every rank gets its summary, the
    state itself stays on rank 0 (None elsewhere)."""
    prepared = {}

    def decide() -> resume.ResumeSummary | None:
        prepared["state"] = prepare_run_folder(config, model, stack)
        return resume.summarize(prepared["state"])

    return rank0_acts(decide, dist), prepared.get("state")


def _record_start(config: Config, plan: TrainPlan, progress: Progress, changes: list[str], state: dict | None) -> None:
    """Rank 0: config.yaml of this run, and what a changed train.epochs does to the schedule."""
    write_resolved_config(config, plan.derived(), progress.epoch, changes)
    if state is not None:
        resume.say_epochs_change(state, plan, progress)


def _loaders(config: Config, data: DataPlan, index, order: TrainOrder, progress: Progress, rank_state: dict,
             dist: DistInfo, stack: contextlib.ExitStack) -> tuple[TrainLoader, ValLoader]:
    """The training loader from where the run starts and the validation loader, without the images the
    run folder records as undecodable; closed (their workers ended) whatever ends the run."""
    undecodable = known_undecodable(index, config.output_dir, dist)
    train_loader = build_train_loader(data, index, order, start=(progress.epoch, progress.batch),
                                      undecodable=undecodable.get("train", []))
    stack.callback(train_loader.close)
    val_loader = build_val_loader(data, index, batch_size=config.train.batch_size,
                                  undecodable=undecodable.get("val", []))
    stack.callback(val_loader.close)
    return train_loader, val_loader


def _check_classes(index, config: Config) -> None:
    if index is not None and len(index.classes) > config.model.num_classes:
        raise UserError(f"{config.data.root} has {len(index.classes)} classes but model.num_classes="
                        f"{config.model.num_classes}; set model.num_classes={len(index.classes)}")
    if index is not None and len(index.classes) < config.model.num_classes:
        log.warning("model.num_classes=%d but %s has %d classes: %d outputs of the classifier never get a "
                    "training image", config.model.num_classes, config.data.root, len(index.classes),
                    config.model.num_classes - len(index.classes))


def _restore(run: Run, state: dict | None, summary: resume.ResumeSummary, rank_state: dict,
             progress: Progress) -> None:
    resume.restore_optimizer(run.optimizer, state, run.dist)
    if summary.scaler:  # empty when the checkpoint's run did not use fp16
        run.scaler.load_state_dict(summary.scaler)
    if summary.world_size != run.dist.world_size or summary.global_batch != run.plan.global_batch:
        log.warning("resuming a run of world size %d (global batch %s) with world size %d (global batch %d) at "
                    "epoch %d, step %d of %d", summary.world_size, summary.global_batch, run.dist.world_size,
                    run.plan.global_batch, progress.epoch, progress.batch, run.plan.steps_per_epoch)
    if "rng" in rank_state:  # checkpoints written before randomness was seeded per step and sample
        ckpt.set_rng_state(rank_state["rng"])
    restore_averages(unwrap(run.model), run.ema, state, rank_state, run.dist)
    resume.check_agreement(progress.step, run.dist)


def _should_stop(run: Run, requested: bool, write_failed: bool = False) -> bool:
    """Whether any rank was asked to stop; a checkpoint write that failed twice on rank 0 is raised here, on
    every rank at once (agreement.rank0_acts), so that no rank is left waiting in a collective."""
    if not run.dist.distributed:  # no collective, no device sync
        if write_failed:
            run.writer.wait()
        return requested
    flags = torch.tensor([1.0 if requested else 0.0, 1.0 if write_failed else 0.0], device=run.dist.device)
    torch.distributed.all_reduce(flags)
    requested, write_failed = (flags > 0).tolist()
    if write_failed:
        rank0_acts(run.writer.wait if run.dist.is_main else lambda: None, run.dist)
    return requested


def _set_lr(run: Run, step: int) -> float:
    lr = run.plan.lr(step)
    for group in run.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr


def _ramp_dropblock(run: Run, step: int) -> None:
    if run.plan.dropblock_prob > 0:
        # DropBlock ramps linearly from 0 to its probability over training (the released recipe).
        unwrap(run.model).set_dropblock_prob(run.plan.dropblock(step))


def _micro_step(run: Run, step: int, micro_step: int, images, targets, reporter: RunReporter) -> torch.Tensor:
    """One micro-batch of optimizer step `step`: its own random draws (mixup/CutMix, DropBlock, drop path,
    dropout) seeded from (seed, step, micro-batch), so they do not depend on the process that runs it."""
    key = (run.config.train.seed, step, run.order.micro_batch_index(micro_step))
    seed_micro_batch(*key)
    if run.mixup is not None:
        images, targets = run.mixup(images, targets, micro_batch_generator(*key))
    if step == 0 and micro_step == 0:
        reporter.image_grid(images)
    accumulation = run.plan.layout.accumulation
    return forward_backward(run.model, images, targets, criterion=run.criterion, scaler=run.scaler,
                            precision=run.precision, loss_scale=1.0 / accumulation,
                            sync=micro_step == accumulation - 1)


def _train_epoch(run: Run, progress: Progress, reporter: RunReporter, stop) -> bool:
    """Optimizer steps until the epoch ends (True) or a stop is requested (False); checkpoints and stops
    only between optimizer steps."""
    train_mode(run.model, run.config.model.freeze)
    run.train_loader.set_epoch(progress.epoch)
    interval = run.config.checkpoint.interval_steps
    check_every = 1 if not run.dist.distributed else 10
    accumulation = run.plan.layout.accumulation
    record = SampleRecord.from_env(run.dist.rank)
    reporter.start_epoch(progress.epoch)
    losses = []
    for images, targets in run.train_loader:
        reporter.data_ready()
        if not losses:
            lr = _set_lr(run, progress.step)
            _ramp_dropblock(run, progress.step)
        record.write(progress, run.order.micro_batch_index(len(losses)), run.train_loader.last_samples,
                     run.train_loader.last_draws)
        losses.append(_micro_step(run, progress.step, len(losses), images, targets, reporter))
        if len(losses) < accumulation:
            reporter.micro_step_done()
            continue
        optimizer_step(run.optimizer, run.scaler)
        if run.ema is not None:
            run.ema.update(unwrap(run.model), progress.step + 1)
        # a failed background write is written again now; failing twice, it stops the run at the next agreement
        write_failed = run.writer is not None and run.writer.check()
        progress.batch += 1
        progress.step += 1
        reporter.step_done(progress.step, progress.batch, torch.stack(losses).mean() if accumulation > 1
                           else losses[0], lr, run.plan.global_batch)
        losses = []
        if progress.batch == run.plan.steps_per_epoch:
            continue  # the epoch-end checkpoint follows the last batch
        saved = bool(interval) and progress.step % interval == 0
        if saved:
            save(run, progress, epoch_loss=reporter.epoch_loss())
        # Ranks agree on a stop every `check_every` steps (a collective and a host sync) and after each
        # interval checkpoint, which has just synchronised them anyway.
        if (saved or progress.step % check_every == 0) and _should_stop(run, stop.requested, write_failed):
            if not saved:
                save(run, progress, epoch_loss=reporter.epoch_loss())
            return False
    return True


def _evaluate(run: Run) -> dict:
    """The model and its EMA, each with its BN statistics made the same on every rank first (dist_bn), so
    that what is evaluated is what rank 0 saves."""
    models = {"": unwrap(run.model), **({"_ema": run.ema.module} if run.ema is not None else {})}
    metrics, started = {}, time.perf_counter()
    for suffix, module in models.items():
        distribute_bn(module, run.dist, run.config.train.dist_bn)
        on_device = module if suffix == "" else run.ema.on(run.dist.device)
        result = validate(on_device, run.val_loader, run.dist, run.precision)
        metrics.update({f"val_top1{suffix}": result.top1, f"val_top5{suffix}": result.top5})
    return {**metrics, "val_images": result.num_images, "val_seconds": time.perf_counter() - started}


def _fit(run: Run, progress: Progress, stop) -> None:
    config = run.config
    reporter = RunReporter(config.output_dir, run.dist, run.plan, log_interval=config.train.log_interval,
                           changes=run.changes, resumed_loss=run.resumed_loss)
    reporter.summary(run.summary)
    try:
        while progress.epoch < config.train.epochs:
            if not _train_epoch(run, progress, reporter, stop):
                wait_for_writes(run)
                log.info("stopped at step %d; rerun the same command to continue (from epoch %d  step %d/%d)",
                         progress.step, progress.epoch + 1, progress.batch, run.plan.steps_per_epoch)
                return
            metrics = {"epoch": progress.epoch + 1, "train_size": run.data.train_size(progress.epoch),
                       **reporter.end_epoch(progress.step, run.optimizer.param_groups[0]["lr"])}
            progress.epoch += 1
            progress.batch = 0
            is_best = False
            if progress.epoch % config.train.eval_interval == 0 or progress.epoch == config.train.epochs:
                metrics.update(_evaluate(run))
                # best.pt: the best EMA top-1 when the EMA is on (the weights such recipes report), else the model's
                chosen = metrics["val_top1_ema" if run.ema is not None else "val_top1"]
                is_best = chosen > progress.best_top1
                progress.best_top1 = max(progress.best_top1, chosen)
            else:
                metrics.update(val_top1=None, val_top5=None)
            reporter.epoch_metrics(metrics)
            save(run, progress, is_best=is_best)
            if _should_stop(run, stop.requested):
                wait_for_writes(run)
                log.info("stopped after epoch %d; rerun the same command to continue", progress.epoch)
                return
        wait_for_writes(run)
        log.info("finished: %d epochs, best val top-1 %.2f; run folder %s", progress.epoch, progress.best_top1,
                 config.output_dir)
    finally:
        reporter.close()
