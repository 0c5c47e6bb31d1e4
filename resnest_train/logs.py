"""What a run reports: console progress, TensorBoard scalars, `metrics.jsonl`, the resolved `config.yaml`.

Only global rank 0 writes files and progress lines; other ranks log warnings only (no monkeypatched print).
Step losses stay on the device and are fetched in one transfer every `train.log_interval` steps, so
logging adds no host sync per step; TensorBoard still gets every step's loss and lr.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import torch

from resnest_train.config import Config, to_yaml
from resnest_train.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from resnest_train.distributed import DistInfo

log = logging.getLogger("resnest_train")


def configure_logging(dist: DistInfo) -> None:
    level = logging.INFO if dist.is_main else logging.WARNING
    prefix = f"[rank {dist.rank}] " if dist.distributed else ""
    logging.basicConfig(level=level, stream=sys.stdout, force=True,
                        format=f"%(asctime)s {prefix}%(message)s", datefmt="%H:%M:%S")


class RunLogger:
    def __init__(self, config: Config, dist: DistInfo, run):
        self.config = config
        self.dist = dist
        self.run = run
        self.out = Path(config.output_dir)
        self.writer = None
        if dist.is_main:
            from torch.utils.tensorboard import SummaryWriter
            self.out.mkdir(parents=True, exist_ok=True)
            derived = {"lr": run.peak_lr, "global_batch": config.train.batch_size * dist.world_size,
                       "world_size": dist.world_size, "steps_per_epoch": run.steps_per_epoch}
            (self.out / "config.yaml").write_text(to_yaml(config, derived))
            self.writer = SummaryWriter(str(self.out / "tb"))
        self._pending: list[tuple[int, torch.Tensor, float]] = []

    def info(self, message: str, *args) -> None:
        log.info(message, *args)

    # ------------------------------------------------------------------------------------------- steps
    def start_epoch(self, epoch: int, batch: int) -> None:
        self.epoch = epoch
        self.epoch_start = self.interval_start = self.data_start = time.perf_counter()
        self.data_wait = self.interval_wait = 0.0
        self.epoch_images = self.interval_images = 0
        self.loss_sum = torch.zeros((), device=self.dist.device)
        self.loss_count = 0
        self.first_batch = batch

    def data_ready(self) -> None:
        waited = time.perf_counter() - self.data_start
        self.data_wait += waited
        self.interval_wait += waited

    def step_done(self, step: int, batch: int, loss: torch.Tensor, lr: float, images: int) -> None:
        self.loss_sum += loss
        self.loss_count += 1
        self.epoch_images += images
        self.interval_images += images
        self._pending.append((step, loss, lr))
        if step % self.config.train.log_interval == 0 or batch == self.run.steps_per_epoch:
            self._flush(step, batch)
        self.data_start = time.perf_counter()

    def _flush(self, step: int, batch: int) -> None:
        losses = torch.stack([loss for _, loss, _ in self._pending]).float().cpu().tolist()  # one sync
        now = time.perf_counter()
        elapsed = max(now - self.interval_start, 1e-9)
        speed = self.interval_images / elapsed
        if self.writer is not None:
            for (s, _, lr), value in zip(self._pending, losses):
                self.writer.add_scalar("train/loss", value, s)
                self.writer.add_scalar("train/lr", lr, s)
            self.writer.add_scalar("perf/images_per_sec", speed, step)
        remaining = self.run.total_steps - step
        eta = remaining * elapsed / max(len(self._pending), 1)
        log.info("epoch %d  step %d/%d  loss %.4f  lr %.5f  %.1f img/s  data %.0f%%  eta %s",
                 self.epoch + 1, batch, self.run.steps_per_epoch, sum(losses) / len(losses), self._pending[-1][2],
                 speed, 100 * self.interval_wait / elapsed, _duration(eta))
        self._pending.clear()
        self.interval_start, self.interval_wait, self.interval_images = now, 0.0, 0

    def image_grid(self, images: torch.Tensor) -> None:
        """The first training batch as the model sees it (after augmentation and mixup), de-normalised."""
        if self.writer is None:
            return
        from torchvision.utils import make_grid
        batch = images[:16].detach().float().cpu()
        mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
        std = torch.tensor(IMAGENET_STD)[:, None, None]
        self.writer.add_image("train/augmented_batch", make_grid((batch * std + mean).clamp(0, 1), nrow=4), 0)

    # ------------------------------------------------------------------------------------------- epochs
    def end_epoch(self) -> dict:
        seconds = time.perf_counter() - self.epoch_start
        loss = (self.loss_sum / max(self.loss_count, 1)).item()
        return {"train_loss": loss, "lr": self.run.optimizer.param_groups[0]["lr"],
                "images_per_sec": self.epoch_images / max(seconds, 1e-9),
                "data_wait_share": self.data_wait / max(seconds, 1e-9), "epoch_seconds": seconds,
                "world_size": self.dist.world_size, "step": self.run.step}

    def epoch_metrics(self, metrics: dict) -> None:
        if metrics.get("val_top1") is not None:
            log.info("epoch %d  val top-1 %.2f  top-5 %.2f  (%d images)  train loss %.4f  %.1f img/s",
                     metrics["epoch"], metrics["val_top1"], metrics["val_top5"], metrics["val_images"],
                     metrics["train_loss"], metrics["images_per_sec"])
        if self.writer is None:
            return
        if metrics.get("val_top1") is not None:
            self.writer.add_scalar("val/top1", metrics["val_top1"], metrics["epoch"])
            self.writer.add_scalar("val/top5", metrics["val_top5"], metrics["epoch"])
        self.writer.add_scalar("train/epoch_loss", metrics["train_loss"], metrics["epoch"])
        self.writer.flush()
        with open(self.out / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(metrics) + "\n")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
