"""What a run reports: console progress, TensorBoard scalars and images, `metrics.jsonl`.

Only global rank 0 writes files and progress lines; other ranks log warnings only (no monkeypatched print).
Step losses stay on the device and are fetched in one transfer every `train.log_interval` steps, so
logging adds no host sync per step; TensorBoard still gets every step's loss and lr.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

from resnest_train.cluster.distributed import DistInfo, all_reduce_sum
from resnest_train.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from resnest_train.recipe.schedule import TrainPlan

log = logging.getLogger("resnest_train")


def configure_logging(dist: DistInfo) -> None:
    level = logging.INFO if dist.is_main else logging.WARNING
    prefix = f"[rank {dist.rank}] " if dist.distributed else ""
    logging.basicConfig(level=level, stream=sys.stdout, force=True,
                        format=f"%(asctime)s {prefix}%(message)s", datefmt="%H:%M:%S")


def truncate_metrics(output_dir: str | Path, epoch: int) -> None:
    """Keep the rows of epochs up to `epoch` (the resumed one): a run resumed from an older checkpoint
    repeats later epochs, which must not appear twice."""
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in rows if json.loads(line).get("epoch", 0) <= epoch]
    if len(kept) != len(rows):
        path.write_text("".join(f"{line}\n" for line in kept))


class RunReporter:
    def __init__(self, output_dir: str | Path, dist: DistInfo, plan: TrainPlan, *, log_interval: int,
                 changes: list[str] = (), resumed_loss: tuple[float, int] = (0.0, 0)):
        self.dist, self.plan, self.log_interval = dist, plan, log_interval
        # the resumed epoch's loss before the checkpoint (sum of its steps' global-batch losses, steps): the
        # epoch's train_loss is the mean over the whole epoch, across a resume
        self.carried = resumed_loss
        self.changes = list(changes)  # recorded in the next metrics row (checkpoint.allow_changes)
        self.out = Path(output_dir)
        self.writer = None
        if dist.is_main:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.out / "tb"))
        self._pending: list[tuple[int, torch.Tensor, float]] = []
        self.epoch_started = False

    # ------------------------------------------------------------------------------------------- steps
    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.epoch_start = self.interval_start = self.data_start = time.perf_counter()
        self.data_wait = self.interval_wait = 0.0
        self.epoch_images = self.interval_images = 0
        self.loss_sum = torch.zeros((), device=self.dist.device)
        self.loss_count = 0
        if self.epoch_started:
            self.carried = (0.0, 0)  # only the first epoch of a run can be a resumed one
        self.epoch_started = True

    def data_ready(self) -> None:
        waited = time.perf_counter() - self.data_start
        self.data_wait += waited
        self.interval_wait += waited

    def micro_step_done(self) -> None:
        """A micro-batch computed: the wait for the next one starts now."""
        self.data_start = time.perf_counter()

    def step_done(self, step: int, batch: int, loss: torch.Tensor, lr: float, images: int) -> None:
        """`loss`: this process's mean over its micro-batches of the step; `images`: the global batch."""
        self.loss_sum += loss
        self.loss_count += 1
        self.epoch_images += images
        self.interval_images += images
        self._pending.append((step, loss, lr))
        if step % self.log_interval == 0 or batch == self.plan.steps_per_epoch:
            self._flush(step, batch)
        self.data_start = time.perf_counter()

    def _flush(self, step: int, batch: int) -> None:
        # The mean over the global batch: every process's losses, in one collective and one transfer.
        stacked = torch.stack([loss for _, loss, _ in self._pending]).float()
        losses = (all_reduce_sum(stacked, self.dist) / self.dist.world_size).cpu().tolist()
        now = time.perf_counter()
        elapsed = max(now - self.interval_start, 1e-9)
        speed = self.interval_images / elapsed
        if self.writer is not None:
            for (s, _, lr), value in zip(self._pending, losses):
                self.writer.add_scalar("train/loss", value, s)
                self.writer.add_scalar("train/lr", lr, s)
            self.writer.add_scalar("perf/images_per_sec", speed, step)
        eta = max(self.plan.total_steps - step, 0) * elapsed / max(len(self._pending), 1)
        log.info("epoch %d  step %d/%d  loss %.4f  lr %.5f  %.1f img/s  data %.0f%%  eta %s",
                 self.epoch + 1, batch, self.plan.steps_per_epoch, sum(losses) / len(losses), self._pending[-1][2],
                 speed, 100 * self.interval_wait / elapsed, _duration(eta))
        self._pending.clear()
        self.interval_start, self.interval_wait, self.interval_images = now, 0.0, 0

    def image_grid(self, images: torch.Tensor) -> None:
        """A training batch as the model sees it (after augmentation and mixup), de-normalised."""
        if self.writer is None:
            return
        from torchvision.utils import make_grid
        batch = images[:16].detach().float().cpu()
        mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
        std = torch.tensor(IMAGENET_STD)[:, None, None]
        self.writer.add_image("train/augmented_batch", make_grid((batch * std + mean).clamp(0, 1), nrow=4), 0)

    # ------------------------------------------------------------------------------------------- epochs
    def epoch_loss(self) -> tuple[float, int]:
        """(sum of the global-batch losses of the epoch's steps so far, steps), across a resume; every rank
        calls it (one collective). A checkpoint stores it."""
        total = all_reduce_sum(self.loss_sum.double().reshape(1), self.dist) / self.dist.world_size
        return total.item() + self.carried[0], self.loss_count + self.carried[1]

    def end_epoch(self, step: int, lr: float) -> dict:
        seconds = time.perf_counter() - self.epoch_start
        total, steps = self.epoch_loss()
        loss = total / max(steps, 1)
        return {"train_loss": loss, "lr": lr, "images_per_sec": self.epoch_images / max(seconds, 1e-9),
                "data_wait_share": self.data_wait / max(seconds, 1e-9), "epoch_seconds": seconds,
                "world_size": self.dist.world_size, "step": step}

    def epoch_metrics(self, metrics: dict) -> None:
        if metrics.get("val_top1") is not None:
            ema = f"  EMA top-1 {metrics['val_top1_ema']:.2f}" if metrics.get("val_top1_ema") is not None else ""
            log.info("epoch %d  val top-1 %.2f  top-5 %.2f%s  (%d images)  train loss %.4f  %.1f img/s",
                     metrics["epoch"], metrics["val_top1"], metrics["val_top5"], ema, metrics["val_images"],
                     metrics["train_loss"], metrics["images_per_sec"])
        if self.writer is None:
            return
        if metrics.get("val_top1") is not None:
            self.writer.add_scalar("val/top1", metrics["val_top1"], metrics["step"])
            if metrics.get("val_top1_ema") is not None:  # train.ema
                self.writer.add_scalar("val/top1_ema", metrics["val_top1_ema"], metrics["step"])
                self.writer.add_scalar("val/top5_ema", metrics["val_top5_ema"], metrics["step"])
            self.writer.add_scalar("val/top5", metrics["val_top5"], metrics["step"])
        # Every scalar on one x-axis, the global step: epoch-level ones at the step that ends the epoch.
        self.writer.add_scalar("train/epoch_loss", metrics["train_loss"], metrics["step"])
        self.writer.add_scalar("train/epoch", metrics["epoch"], metrics["step"])
        if metrics.get("train_size") is not None:  # the epoch's training crop (data.progressive_resize)
            self.writer.add_scalar("train/size", metrics["train_size"], metrics["step"])
        self.writer.flush()
        if self.changes:
            metrics, self.changes = {**metrics, "resumed_with_changes": self.changes}, []
        with open(self.out / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(metrics) + "\n")

    def summary(self, lines: list[str]) -> None:
        """The run's start-up summary: one block in the log, and in TensorBoard's text tab."""
        log.info("run summary:\n  %s", "\n  ".join(lines))
        if self.writer is not None:
            self.writer.add_text("run/summary", "  \n".join(lines), 0)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class SampleRecord:
    """Which training samples each micro-batch held, one JSON line per micro-batch in
    `$RESNEST_TRAIN_SAMPLE_LOG/rank<R>.jsonl` when that variable names a folder (tests check the data
    order with it: every image of an epoch used exactly once, whatever the processes); a no-op otherwise."""

    def __init__(self, path: Path | None):
        self.path = path

    @classmethod
    def from_env(cls, rank: int) -> SampleRecord:
        folder = os.environ.get("RESNEST_TRAIN_SAMPLE_LOG")
        return cls(Path(folder) / f"rank{rank}.jsonl" if folder else None)

    def write(self, progress, micro_batch: int, samples: torch.Tensor, draws=None) -> None:
        """`draws`: the micro-batch's augmentation draws (draws.py), recorded per sample when given."""
        if self.path is None:
            return
        row = {"epoch": progress.epoch, "step": progress.step, "micro_batch": micro_batch,
               "samples": samples.tolist()}
        if draws is not None:
            row["draws"] = [draws.row(i) for i in range(len(samples))] if hasattr(draws, "row") else list(draws)
        with open(self.path, "a") as handle:
            handle.write(json.dumps(row) + "\n")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def start_summary(dist: DistInfo, data, index, plan: TrainPlan, resumed_world_size: int | None,
                  progress, order) -> list[str]:
    """The start-up summary's lines: backend, data, batch layout, schedule, where the run starts
    (`resumed_world_size`: the processes of the run resumed, None for a fresh run; `progress`: where
    training continues), and with data.shuffle=shards the window of `order` (data/order.py)."""
    layout = "webdataset shards" if index is not None and index.layout == "shards" else "class folders"
    images = (f"{len(index.classes)} classes, {len(index.train)} training / {len(index.val)} validation images in "
              f"{data.root} ({layout})" if index is not None
              else f"synthetic: {plan.steps_per_epoch * plan.global_batch} images")
    decoder = f" (decoding on the {data.decoder.upper()})" if data.backend == "dali" else ""
    start = (f"resumed at epoch {progress.epoch + 1}, step {progress.epoch_step}/{plan.steps_per_epoch} (global "
             f"step {progress.step}) of a run on {resumed_world_size} processes" if resumed_world_size is not None
             else "a fresh run")
    sizes = ""
    if data.progressive_resize is not None:
        start_size, end_size, start_epoch, end_epoch = data.progressive_resize
        sizes = (f", training crop {start_size} px to epoch {start_epoch}, {end_size} px from epoch {end_epoch} "
                 "(progressive resizing)")
    return [f"backend {data.backend}{decoder}, device {dist.device}, {dist.world_size} processes{sizes}", images,
            f"global batch {plan.global_batch} = {dist.world_size} processes x micro-batch {plan.layout.micro_batch} "
            f"x {plan.layout.accumulation} accumulation steps",
            f"{plan.steps_per_epoch} steps per epoch, {plan.total_steps} in all ({plan.warmup_steps} warmup), peak "
            f"lr {plan.peak_lr:g}", start, *_shard_window(order)]


def _shard_window(order) -> list[str]:
    """data.shuffle=shards: the window a shard cache has to hold, in shards and images (a mean shard's)."""
    if order.groups is None:
        return []
    shards = order.num_shards
    windows = -(-shards // order.window)
    return [f"data.shuffle=shards: images shuffled within windows of {order.window} shards (about "
            f"{order.num_samples * min(order.window, shards) / shards:.0f} images; {windows} window(s) of the "
            f"{shards} training shards per epoch)"]
