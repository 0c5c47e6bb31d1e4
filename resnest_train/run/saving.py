"""Checkpoints during a run (their format: checkpoint/format.py): each rank's part, rank 0's copy of the
state to host memory and its write in the background (checkpoint/writer.py), and the outcome on every
rank: a write that fails twice (it is written again at the next step) is one `error:` line everywhere and
loses only the steps since the previous checkpoint (which is intact). `run` is the setup's `Run`."""

from __future__ import annotations

from resnest_train.checkpoint.format import Checkpoint, RankPart
from resnest_train.cluster.agreement import rank0_acts
from resnest_train.cluster.distributed import gather_object
from resnest_train.config_yaml import to_dict
from resnest_train.data.undecodable import add_to_record
from resnest_train.recipe.averaging import rank_buffers, saved_statistics
from resnest_train.run.resume import Progress
from resnest_train.run.wrapping import unwrap


def save(run, progress: Progress, *, is_best: bool = False, epoch_loss: tuple[float, int] = (0.0, 0),
         epoch_metrics: dict | None = None) -> None:
    """Every rank contributes its BN statistics (each rank's own between evaluations; randomness is seeded
    per step and sample, so no generator state is needed); rank 0 copies the checkpoint to host memory and
    writes it in the background. `epoch_loss`: mid-epoch, the epoch's loss so far
    (`RunReporter.epoch_loss`), continued by a resumed run. `epoch_metrics`: at an epoch's end, before its
    evaluation, the epoch's metrics row so far, which a run resumed from this checkpoint evaluates and
    completes (epoch_end.py)."""
    mine = RankPart(rank_buffers(unwrap(run.model)), rank_buffers(run.ema.module) if run.ema is not None else None)
    gathered = gather_object((mine, run.train_loader.newly_undecodable()), run.dist)
    mode = run.config.train.dist_bn
    statistics = saved_statistics(unwrap(run.model), run.dist, mode)
    ema_statistics = saved_statistics(run.ema.module, run.dist, mode) if run.ema is not None else {}

    def write() -> None:
        add_to_record(run.config.output_dir, [path for _, found in gathered for path in found])
        model = unwrap(run.model).state_dict()
        model.update(statistics)  # the BN statistics of the ranks' mean (train.dist_bn)
        checkpoint = Checkpoint(
            model=model, optimizer=run.optimizer.state_dict(), epoch=progress.epoch, epoch_step=progress.epoch_step,
            step=progress.step, ranks=[part for part, _ in gathered], scaler=run.scaler.state_dict(),
            best_top1=progress.best_top1, config=to_dict(run.config), world_size=run.dist.world_size,
            global_batch=run.plan.global_batch, micro_batch=run.plan.layout.micro_batch,
            steps_per_epoch=run.plan.steps_per_epoch, provenance=run.provenance, epoch_loss=tuple(epoch_loss),
            epoch_seed=run.order.epoch_seed(progress.epoch), epoch_shuffle=run.order.shuffle,
            epoch_metrics=epoch_metrics,
            ema={**run.ema.state_dict(), **ema_statistics} if run.ema is not None else None)
        run.writer.save(checkpoint.to_state(), is_best=is_best)  # first waits for the write in flight

    rank0_acts(write, run.dist)  # no rank waits for a save that failed


def wait_for_writes(run) -> None:
    """Before a stop or the end of the run: the write in flight is on disk, or its error on every rank."""
    rank0_acts(run.writer.wait if run.dist.is_main else lambda: None, run.dist)
