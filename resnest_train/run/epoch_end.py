"""The end of an epoch: its checkpoint, its evaluation, `best.pt` and its `metrics.jsonl` row.

The checkpoint of an epoch that is evaluated is written before the evaluation, so that an evaluation that
fails (an image the validation decoder cannot read, a process killed while it runs) loses none of the
epoch's training. That checkpoint carries the epoch's metrics row without its validation figures
(`epoch_metrics`): a run resumed from it owes the evaluation and runs it first, neither skipping the epoch's
evaluation nor training the epoch again. Once evaluated, the row is written and the checkpoint written
again, without `epoch_metrics`, with the best top-1 so far and, where it is the best, as `best.pt` (which
needs the evaluation's result). A run stopped between the row and that second checkpoint evaluates the
epoch again at resume, where `metrics.jsonl` is first cut back before it (`setup._record_start`): every
epoch has one row.
"""

from __future__ import annotations

import logging
import time

from resnest_train.data.shard_caches import epoch_report, evaluation
from resnest_train.recipe.averaging import distribute_bn
from resnest_train.recipe.engine import validate
from resnest_train.run.reporting import RunReporter
from resnest_train.run.resume import Progress
from resnest_train.run.saving import save
from resnest_train.run.wrapping import unwrap

log = logging.getLogger("resnest_train")


def end_epoch(run, progress: Progress, reporter: RunReporter, metrics: dict) -> None:
    """After an epoch's last step (`progress` at the start of the next epoch): the epoch's checkpoint and
    row, with its evaluation in between when one is due. `run` is the runner's `Run`."""
    train = run.config.train
    traffic = epoch_report()  # a remote data root: what the node's shard cache fetched in the epoch
    if traffic and run.dist.is_main:
        log.info(traffic)
    if progress.epoch % train.eval_interval != 0 and progress.epoch != train.epochs:
        reporter.epoch_metrics({**metrics, "val_top1": None, "val_top5": None})
        save(run, progress)
        return
    save(run, progress, epoch_metrics=metrics)  # the epoch's training is kept whatever the evaluation does
    finish_epoch(run, progress, reporter, metrics)


def finish_epoch(run, progress: Progress, reporter: RunReporter, metrics: dict) -> None:
    """The evaluation of the epoch whose checkpoint was just written (or that a resumed run owes; `metrics`:
    its row so far), its row, and its checkpoint once more, as `best.pt` when its top-1 is the best yet."""
    metrics = {**metrics, **evaluate(run)}
    # best.pt: the best EMA top-1 when the EMA is on (the weights such recipes report), else the model's
    chosen = metrics["val_top1_ema" if run.ema is not None else "val_top1"]
    is_best = chosen > progress.best_top1
    progress.best_top1 = max(progress.best_top1, chosen)
    reporter.epoch_metrics(metrics)
    save(run, progress, is_best=is_best)


def evaluate(run) -> dict:
    """The model and its EMA, each with its BN statistics made the same on every rank first (dist_bn), so
    that what is evaluated is what rank 0 saves."""
    models = {"": unwrap(run.model), **({"_ema": run.ema.module} if run.ema is not None else {})}
    metrics, started = {}, time.perf_counter()
    for suffix, module in models.items():
        distribute_bn(module, run.dist, run.config.train.dist_bn)
        on_device = module if suffix == "" else run.ema.on(run.dist.device)
        with evaluation():  # a remote root's cache keeps the validation shards meanwhile
            result = validate(on_device, run.val_loader, run.dist, run.precision)
        metrics.update({f"val_top1{suffix}": result.top1, f"val_top5{suffix}": result.top5})
    return {**metrics, "val_images": result.num_images, "val_seconds": time.perf_counter() - started}
