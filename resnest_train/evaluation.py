"""evaluate.py's work: a checkpoint measured at one or more crop sizes, every image counted exactly once.

For each crop: resize the shorter side to ceil(crop / data.val_resize_ratio) (224 -> 256), center crop,
normalize. Each rank reads its own slice of the val list with no padding and the counts are summed across
ranks, so the numbers are identical on any number of processes.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path

import torch

from resnest_train.config import Config, resize_size
from resnest_train.data import build_val_loader, load_index
from resnest_train.distributed import DistInfo, barrier, cleanup, setup_distributed
from resnest_train.engine import evaluate, resolve_precision
from resnest_train.logs import configure_logging
from resnest_train.modeling import load_weights
from resnest_train.models import create_model

log = logging.getLogger("resnest_train")


def evaluate_checkpoint(config: Config, checkpoint: str, *, crop_sizes: list[int] | None = None,
                        output: str | None = None, predictions: str | None = None,
                        batch_size: int | None = None) -> dict:
    dist = setup_distributed()
    configure_logging(dist)
    try:
        return _evaluate(config, dist, checkpoint, crop_sizes or [config.data.val_crop_size], output,
                         predictions, batch_size)
    finally:
        cleanup(dist)


def _evaluate(config, dist: DistInfo, checkpoint, crop_sizes, output, predictions, batch_size) -> dict:
    model = create_model(config.model.name, num_classes=config.model.num_classes)
    load_weights(model, checkpoint, "--checkpoint", f"{config.model.name} ({config.model.num_classes} classes)")
    model = model.to(dist.device, memory_format=torch.channels_last if config.train.channels_last
                     else torch.contiguous_format).eval()
    precision = resolve_precision(config.train.amp, dist.device)
    index = None if config.data.backend == "synthetic" else load_index(config.data.root, write_cache=dist.is_main)
    results = []
    for crop in crop_sizes:
        resize = resize_size(crop, config.data.val_resize_ratio)
        loader = build_val_loader(config, dist, index, crop, resize, batch_size)
        started = time.perf_counter()
        result = evaluate(model, loader, dist, precision)
        seconds = time.perf_counter() - started
        results.append({"crop_size": crop, "resize_size": resize, "top1": result["top1"], "top5": result["top5"],
                        "num_images": result["num_images"], "images_per_sec": result["num_images"] / seconds})
    if predictions and index is not None:
        _write_predictions(model, config, dist, index, crop_sizes[0], precision, predictions, batch_size)
    report = {"model": config.model.name, "checkpoint": str(checkpoint), "results": results}
    if dist.is_main:
        _print_table(report)
        if output:
            Path(output).parent.mkdir(parents=True, exist_ok=True)
            Path(output).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _print_table(report: dict) -> None:
    print(f"{report['model']}  {report['checkpoint']}")
    print(f"{'crop':>6} {'resize':>6} {'top-1':>7} {'top-5':>7} {'images':>8} {'img/s':>8}")
    for row in report["results"]:
        print(f"{row['crop_size']:>6} {row['resize_size']:>6} {row['top1']:>7.2f} {row['top5']:>7.2f} "
              f"{row['num_images']:>8} {row['images_per_sec']:>8.1f}")


@torch.no_grad()
def _write_predictions(model, config, dist, index, crop, precision, path, batch_size) -> None:
    """Per-image top-5 classes and probabilities; ranks' rows gathered on rank 0 in val-list order."""
    loader = build_val_loader(config, dist, index, crop, resize_size(crop, config.data.val_resize_ratio), batch_size)
    rows = []
    for images, _ in loader:
        with precision.autocast():
            probs = model(images).float().softmax(dim=1)
        top = probs.topk(min(5, probs.shape[1]), dim=1)
        rows.extend(zip(top.indices.tolist(), top.values.tolist()))
    gathered = [rows]
    if dist.distributed:
        gathered = [None] * dist.world_size
        torch.distributed.all_gather_object(gathered, rows)
    if dist.is_main:
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "label", "top5_classes", "top5_probs"])
            for rank, rank_rows in enumerate(gathered):
                for (file, label), (classes, probs) in zip(index.val[rank::dist.world_size], rank_rows):
                    writer.writerow([file, label, " ".join(map(str, classes)), " ".join(f"{p:.4f}" for p in probs)])
    barrier(dist)
