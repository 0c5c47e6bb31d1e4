"""The loop, read top to bottom as one screen: epochs of optimizer steps, each step `accumulation`
micro-steps, then the update, what follows an update (EMA, the background write's check, reporting, the
step hook), and the checkpoint or stop between steps; each epoch ends in epoch_end.py (its checkpoint, then
its evaluation, best.pt and metrics row).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from resnest_train.cluster.agreement import rank0_acts
from resnest_train.recipe.engine import forward_backward, optimizer_step
from resnest_train.recipe.randomness import micro_batch_generator, seed_micro_batch
from resnest_train.run.epoch_end import end_epoch, finish_epoch
from resnest_train.run.reporting import RunReporter, SampleRecord
from resnest_train.run.resume import Progress
from resnest_train.run.saving import save, wait_for_writes
from resnest_train.run.setup import Run
from resnest_train.run.wrapping import train_mode, unwrap

log = logging.getLogger("resnest_train")

StepHook = Callable[[], None]  # called after every optimizer step (scripts/benchmark_trainer.py times them)


def fit(run: Run, progress: Progress, stop, on_step: StepHook | None = None) -> None:
    """Epochs until `train.epochs`, or until a stop is requested (then a checkpoint, and a clean return)."""
    config = run.config
    reporter = RunReporter(config.output_dir, run.dist, run.plan, log_interval=config.train.log_interval,
                           changes=run.changes, resumed_loss=run.resumed_loss)
    reporter.summary(run.summary)
    try:
        if run.owed is not None:  # resumed at an epoch's end checkpointed before its evaluation
            log.info("evaluating epoch %d, checkpointed before its evaluation", progress.epoch)
            finish_epoch(run, progress, reporter, run.owed)
        while progress.epoch < config.train.epochs:
            if not train_epoch(run, progress, reporter, stop, on_step):
                wait_for_writes(run)
                log.info("stopped at step %d; rerun the same command to continue (from epoch %d  step %d/%d)",
                         progress.step, progress.epoch + 1, progress.epoch_step, run.plan.steps_per_epoch)
                return
            metrics = {"epoch": progress.epoch + 1, "train_size": run.data.train_size(progress.epoch),
                       **reporter.end_epoch(progress.step, run.optimizer.param_groups[0]["lr"])}
            progress.epoch, progress.epoch_step = progress.epoch + 1, 0
            end_epoch(run, progress, reporter, metrics)
            if should_stop(run, stop.requested):
                wait_for_writes(run)
                log.info("stopped after epoch %d; rerun the same command to continue", progress.epoch)
                return
        wait_for_writes(run)
        log.info("finished: %d epochs, best val top-1 %.2f; run folder %s", progress.epoch, progress.best_top1,
                 config.output_dir)
    finally:
        reporter.close()


def train_epoch(run: Run, progress: Progress, reporter: RunReporter, stop, on_step: StepHook | None) -> bool:
    """Optimizer steps until the epoch ends (True) or a stop is requested (False); checkpoints and stops
    only between optimizer steps."""
    train_mode(run.model, run.config.model.freeze)
    run.train_loader.set_epoch(progress.epoch)
    batches = iter(run.train_loader)
    record = SampleRecord.from_env(run.dist.rank)
    reporter.start_epoch(progress.epoch)
    accumulation = run.plan.layout.accumulation
    while progress.epoch_step < run.plan.steps_per_epoch:
        lr = start_step(run, progress.step)
        losses = []
        for micro in range(accumulation):
            images, targets = next(batches)
            reporter.data_ready()
            record.write(progress, run.order.micro_batch_index(micro), run.train_loader.last_samples,
                         run.train_loader.last_draws)
            images, targets = draw_micro_batch(run, progress.step, micro, images, targets)
            if progress.step == 0 and micro == 0:
                reporter.image_grid(images)  # what the model sees first, mixed
            losses.append(forward_backward(run.model, images, targets, criterion=run.criterion, scaler=run.scaler,
                                           precision=run.precision, loss_scale=1.0 / accumulation,
                                           sync=micro == accumulation - 1))
            if micro < accumulation - 1:
                reporter.micro_step_done()
        optimizer_step(run.optimizer, run.scaler, run.config.optim.clip_grad)
        write_failed = after_step(run, progress, reporter, losses, lr, on_step)
        if progress.epoch_step < run.plan.steps_per_epoch and checkpoint_or_stop(run, progress, reporter, stop,
                                                                                   write_failed):
            return False
    if next(batches, None) is not None:  # lets the loader's pass end (a DataLoader's iterator, DALI's)
        raise RuntimeError("the training loader yielded more micro-batches than the epoch has")
    return True


def start_step(run: Run, step: int) -> float:
    """The schedules' values for optimizer step `step`: the lr (x each group's lr_scale) and DropBlock's
    probability, which ramps from 0 over training (the released recipe)."""
    lr = run.plan.lr(step)
    for group in run.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    if run.plan.dropblock_prob > 0:
        unwrap(run.model).set_dropblock_prob(run.plan.dropblock(step))
    return lr


def draw_micro_batch(run: Run, step: int, micro: int, images, targets):
    """Micro-batch `micro` of optimizer step `step` gets its own random draws (mixup/CutMix here; DropBlock,
    drop path and dropout in the forward that follows), seeded from (seed, step, micro-batch), so they do not
    depend on the process that runs it. Returns the (mixed) images and targets."""
    key = (run.config.train.seed, step, run.order.micro_batch_index(micro))
    seed_micro_batch(*key)
    if run.mixup is not None:
        images, targets = run.mixup(images, targets, micro_batch_generator(*key))
    return images, targets


def after_step(run: Run, progress: Progress, reporter: RunReporter, losses: list, lr: float,
               on_step: StepHook | None) -> bool:
    """The EMA, the background write's check (a failed write is written again now; failing twice, it stops
    the run at the next agreement), the step counted and reported. Returns whether the write failed."""
    if run.ema is not None:
        run.ema.update(unwrap(run.model), progress.step + 1)
    write_failed = run.writer is not None and run.writer.check()
    progress.epoch_step += 1
    progress.step += 1
    reporter.step_done(progress.step, progress.epoch_step, torch.stack(losses).mean() if len(losses) > 1
                       else losses[0], lr, run.plan.global_batch)
    if on_step is not None:
        on_step()
    return write_failed


def checkpoint_or_stop(run: Run, progress: Progress, reporter: RunReporter, stop, write_failed: bool) -> bool:
    """A checkpoint every `checkpoint.interval_steps`; True when the ranks agree to stop (after saving).
    Ranks agree on a stop every 10 steps (a collective and a host sync; every step on one process) and
    after each interval checkpoint, which has just synchronised them anyway."""
    interval = run.config.checkpoint.interval_steps
    saved = bool(interval) and progress.step % interval == 0
    if saved:
        save(run, progress, epoch_loss=reporter.epoch_loss())
    check_every = 1 if not run.dist.distributed else 10
    if (saved or progress.step % check_every == 0) and should_stop(run, stop.requested, write_failed):
        if not saved:
            save(run, progress, epoch_loss=reporter.epoch_loss())
        return True
    return False


def should_stop(run: Run, requested: bool, write_failed: bool = False) -> bool:
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
