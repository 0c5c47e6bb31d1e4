"""The recipe: wires config, data, model, optimizer and outputs together and owns the epoch loop.

Read top to bottom: `train()` sets up the process group, `_prepare()` builds everything (resuming when a
checkpoint exists), `_fit()` runs epochs of steps, evaluates, checkpoints and logs. Rank 0 alone writes
files; every rank takes part in the collectives (evaluation counts, checkpoint state, stop requests).
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from resnest_train import checkpoint as ckpt
from resnest_train.config import Config, ConfigError, to_dict
from resnest_train.data import build_train_loader, build_val_loader, load_index, warn_skipped
from resnest_train.distributed import DistInfo, barrier, broadcast_object, cleanup, setup_distributed
from resnest_train.engine import evaluate, resolve_precision, train_step
from resnest_train.errors import UserError
from resnest_train.logs import RunLogger, configure_logging
from resnest_train.modeling import build_model, unwrap
from resnest_train.models.pretrained import WeightsMismatchError, check_fit
from resnest_train.optim import build_optimizer
from resnest_train.recipe import build_criterion, build_mixup, cpu_speed_settings, seed_everything
from resnest_train.schedule import learning_rate

log = logging.getLogger("resnest_train")


@dataclass
class Run:
    """Everything the loop needs; built once by `_prepare`."""

    config: Config
    dist: DistInfo
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    mixup: object
    precision: object
    train_loader: object
    val_loader: object
    peak_lr: float
    steps_per_epoch: int
    epoch: int = 0
    batch: int = 0  # batches done in `epoch`
    step: int = 0
    best_top1: float = -1.0
    stop_requested: bool = False  # set by the SIGTERM/SIGUSR1 handler

    @property
    def total_steps(self) -> int:
        return self.config.train.epochs * self.steps_per_epoch


def train(config: Config) -> Path:
    """Train `config` to completion (or until a stop signal); return the run folder."""
    dist = setup_distributed()
    configure_logging(dist)
    try:
        run = _prepare(config, dist)
        if run is None:
            return Path(config.output_dir)
        _fit(run)
        return Path(config.output_dir)
    finally:
        cleanup(dist)


def _load_dataset_index(config: Config, dist: DistInfo):
    """Rank 0 scans (and caches) the dataset; the others read its cache, or share its error."""
    if config.data.backend == "synthetic":
        return None
    index, error = None, None
    if dist.is_main:
        try:
            index = load_index(config.data.root)
            warn_skipped(index)
        except UserError as exc:
            error = str(exc)
    error = broadcast_object(error, dist)
    if error:
        raise UserError(error)
    return index if index is not None else load_index(config.data.root, write_cache=False)


def _check_resume_fits(config: Config, state: dict, dist: DistInfo) -> None:
    if state.get("world_size") != dist.world_size and state.get("batch", 0) > 0:
        # A DALI reader position restored into another shard layout is undefined: refuse mid-epoch.
        raise ckpt.CheckpointError(
            f"checkpoint at step {state['step']} was taken mid-epoch with world size {state.get('world_size')}; "
            f"resume it with the same number of processes (now {dist.world_size})")


def _prepare(config: Config, dist: DistInfo) -> Run | None:
    train_cfg = config.train
    seed_everything(train_cfg.seed + dist.rank, train_cfg.deterministic)
    cpu_speed_settings(dist.device)
    state = ckpt.find_resume_state(config.checkpoint.resume, config.output_dir)
    if state is not None:
        _check_resume_fits(config, state, dist)
        if state["epoch"] >= train_cfg.epochs:
            log.info("run in %s is already complete (%d epochs); nothing to do", config.output_dir, state["epoch"])
            return None
    index = _load_dataset_index(config, dist)
    model = build_model(config, dist, pretrained=state is None)
    precision = resolve_precision(train_cfg.amp, dist.device)
    global_batch = train_cfg.batch_size * dist.world_size
    peak_lr = config.optim.lr * global_batch / 256
    optimizer = build_optimizer(model, config.optim, peak_lr)
    scaler = torch.amp.GradScaler(dist.device.type, enabled=precision.enabled and precision.dtype == torch.float16)
    rank_state = state["ranks"][dist.rank] if state is not None and dist.world_size == state["world_size"] else {}
    train_loader = build_train_loader(config, dist, index, state=rank_state.get("data"))
    val_loader = build_val_loader(config, dist, index, config.data.val_crop_size, config.data.val_resize_size)
    if len(train_loader) == 0:
        raise ConfigError(f"train.batch_size={train_cfg.batch_size} x {dist.world_size} processes is larger "
                          f"than the training set: no full batch per epoch")
    run = Run(config, dist, model, optimizer, scaler, build_criterion(train_cfg), build_mixup(config),
              precision, train_loader, val_loader, peak_lr, len(train_loader))
    if state is not None:
        _restore(run, state, rank_state)
    return run


def _restore(run: Run, state: dict, rank_state: dict) -> None:
    try:
        check_fit(unwrap(run.model), state["model"])
    except WeightsMismatchError as exc:
        raise ckpt.CheckpointError(
            f"checkpoint in {run.config.output_dir} does not fit model {run.config.model.name}: {exc}; use another "
            "output_dir or checkpoint.resume=null") from None
    unwrap(run.model).load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scaler.load_state_dict(state["scaler"])
    run.epoch, run.batch, run.step = state["epoch"], state["batch"], state["step"]
    if state["world_size"] != run.dist.world_size:
        # Only at an epoch boundary (checked earlier): steps per epoch changed with the global batch, so
        # place the schedule at this epoch's start for the new layout.
        log.warning("resuming a run of world size %d with %d processes at epoch %d", state["world_size"],
                    run.dist.world_size, run.epoch)
        run.step = run.epoch * run.steps_per_epoch
    run.best_top1 = state.get("best_top1", -1.0)
    if "rng" in rank_state:
        ckpt.set_rng_state(rank_state["rng"])


def _install_stop_handlers(run: Run) -> None:
    """SIGTERM / SIGUSR1 (what SLURM and cloud schedulers send before preemption): finish the step, save,
    exit. The flag is agreed on by all ranks before anyone stops, so no rank waits on a missing peer."""
    def request_stop(signum, _frame):
        log.warning("received signal %d: checkpointing after this step, then exiting", signum)
        run.stop_requested = True
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, request_stop)


def _should_stop(run: Run) -> bool:
    if not run.dist.distributed:
        return run.stop_requested
    flag = torch.tensor([1.0 if run.stop_requested else 0.0], device=run.dist.device)
    torch.distributed.all_reduce(flag)
    return bool(flag.item() > 0)


def _save(run: Run, logger: RunLogger, *, is_best: bool = False) -> None:
    """Every rank contributes its RNG and data position; rank 0 writes."""
    rank_state = {"rng": ckpt.rng_state(), "data": run.train_loader.state()}
    if run.dist.distributed:
        ranks = [None] * run.dist.world_size
        torch.distributed.all_gather_object(ranks, rank_state)
    else:
        ranks = [rank_state]
    if run.dist.is_main:
        state = {"model": unwrap(run.model).state_dict(), "optimizer": run.optimizer.state_dict(),
                 "scaler": run.scaler.state_dict(), "epoch": run.epoch, "batch": run.batch, "step": run.step,
                 "best_top1": run.best_top1, "config": to_dict(run.config), "world_size": run.dist.world_size,
                 "ranks": ranks}
        path = ckpt.save_checkpoint(state, run.config.output_dir, keep_last=run.config.checkpoint.keep_last,
                                    is_best=is_best)
        logger.info("saved %s (epoch %d, step %d)", path, run.epoch, run.step)
    barrier(run.dist)


def _set_lr(run: Run) -> float:
    schedule = run.config.schedule
    lr = learning_rate(run.step, total_steps=run.total_steps,
                       warmup_steps=round(schedule.warmup_epochs * run.steps_per_epoch),
                       peak_lr=run.peak_lr, min_lr=schedule.min_lr)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    if run.config.model.dropblock_prob > 0:
        # DropBlock ramps linearly from 0 to its probability over training (the released recipe).
        unwrap(run.model).set_dropblock_prob(run.config.model.dropblock_prob * run.step / run.total_steps)
    return lr


def _train_epoch(run: Run, logger: RunLogger) -> bool:
    """Steps until the epoch ends (True) or a stop is requested (False)."""
    run.model.train()
    if hasattr(run.train_loader, "set_epoch"):
        run.train_loader.set_epoch(run.epoch)
    interval = run.config.checkpoint.interval_steps
    check_every = 1 if not run.dist.distributed else 10
    logger.start_epoch(run.epoch, run.batch)
    for images, targets in run.train_loader:
        logger.data_ready()
        lr = _set_lr(run)
        loss = train_step(run.model, images, targets, criterion=run.criterion, optimizer=run.optimizer,
                          scaler=run.scaler, precision=run.precision, mixup=run.mixup)
        if run.step == 0 and run.batch == 0:
            logger.image_grid(images)
        run.batch += 1
        run.step += 1
        logger.step_done(run.step, run.batch, loss, lr, images.shape[0] * run.dist.world_size)
        if run.batch == run.steps_per_epoch:
            continue  # let the loader end the epoch itself (DALI resets on its own StopIteration)
        if interval and run.step % interval == 0:
            _save(run, logger)
        if run.step % check_every == 0 and _should_stop(run):
            _save(run, logger)
            return False
    return True


def _fit(run: Run) -> None:
    config, dist = run.config, run.dist
    logger = RunLogger(config, dist, run)
    _install_stop_handlers(run)
    try:
        while run.epoch < config.train.epochs:
            if not _train_epoch(run, logger):
                logger.info("stopped at step %d; rerun the same command to continue", run.step)
                return
            epoch_stats = logger.end_epoch()
            run.epoch += 1
            run.batch = 0
            metrics = {"epoch": run.epoch, **epoch_stats}
            if run.epoch % config.train.eval_interval == 0 or run.epoch == config.train.epochs:
                started = time.perf_counter()
                result = evaluate(unwrap(run.model), run.val_loader, dist, run.precision)
                metrics.update(val_top1=result["top1"], val_top5=result["top5"],
                               val_images=result["num_images"], val_seconds=time.perf_counter() - started)
                is_best = result["top1"] > run.best_top1
                run.best_top1 = max(run.best_top1, result["top1"])
            else:
                is_best = False
                metrics.update(val_top1=None, val_top5=None)
            logger.epoch_metrics(metrics)
            _save(run, logger, is_best=is_best)
            if _should_stop(run):
                logger.info("stopped after epoch %d; rerun the same command to continue", run.epoch)
                return
        logger.info("finished: %d epochs, best val top-1 %.2f; run folder %s", run.epoch, run.best_top1,
                    config.output_dir)
    finally:
        logger.close()
