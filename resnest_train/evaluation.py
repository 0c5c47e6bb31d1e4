"""evaluate.py's work: a checkpoint measured at one or more crop sizes, every image counted exactly once.

For each crop: resize the shorter side to `data.val_resize_size`, or ceil(crop / data.val_resize_ratio)
(224 -> 256), center crop, normalize. Each rank reads its own shard of the val list with no padding and the
counts are summed across ranks, so the numbers are identical on any number of processes. The dataset
index and the model come from the same builders as the trainer's; `--predictions` are collected during
the first crop's pass, not by a second one.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import time
from pathlib import Path

import torch

from resnest_train.config import Config
from resnest_train.data import build_data_plan, build_val_loader, load_dataset_index
from resnest_train.data.index import SPLITS
from resnest_train.distributed import DistInfo, cleanup, gather_object, setup_distributed
from resnest_train.engine import resolve_precision, validate
from resnest_train.errors import UserError
from resnest_train.reporting import configure_logging
from resnest_train.wrapping import build_model, load_weights, place

log = logging.getLogger("resnest_train")


def evaluate_checkpoint(config: Config, checkpoint: str, *, crop_sizes: list[int] | None = None,
                        output: str | None = None, predictions: str | None = None,
                        batch_size: int | None = None, classes_file: str | None = None,
                        weights: str = "model") -> dict:
    dist = setup_distributed(config.train.device)
    configure_logging(dist)
    try:
        if predictions and crop_sizes and len(crop_sizes) > 1:
            raise UserError(f"--predictions takes one crop size (got --crop-size {' '.join(map(str, crop_sizes))}); "
                            "run once per crop for the predictions of each")
        for path in (output, predictions):
            if path:
                _check_output(Path(path))
        return _measure(config, dist, checkpoint, crop_sizes or [config.data.val_crop_size], output,
                        predictions, batch_size or config.train.batch_size, classes_file, weights)
    finally:
        cleanup(dist)


def _check_output(path: Path) -> None:
    """Before the evaluation pass: a result that cannot be written must not cost a whole pass first."""
    if path.is_dir():
        raise UserError(f"{path} is a directory; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the folder of {path}: {exc.strerror or exc}") from None
    existed = path.exists()
    try:  # opened, not asked about (os.access says yes to root wherever a write still fails)
        with open(path, "a"):
            pass
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
    if not existed:
        path.unlink(missing_ok=True)


def _measure(config: Config, dist: DistInfo, checkpoint: str, crop_sizes: list[int], output: str | None,
             predictions: str | None, batch_size: int, classes_file: str | None, weights: str) -> dict:
    model = build_model(config.model, pretrained=False)
    load_weights(model, checkpoint, "--checkpoint", f"{config.model.name} ({config.model.num_classes} classes)",
                 weights=weights)
    model = place(model, dist, channels_last=config.train.channels_last).eval()
    precision = resolve_precision(config.train.amp, dist.device)
    plan = build_data_plan(config, dist)
    classes = read_class_list(classes_file, config.model.num_classes) if classes_file else trained_classes(checkpoint)
    # Our checkpoints (or --classes) name the classes: val/ alone is read, each folder labelled by its name (a
    # folder that is not one of them is an error). Other weights: the classes are train/'s, or val/'s without it.
    val_only = classes is not None or not (Path(config.data.root) / "train").is_dir()
    index = load_dataset_index(plan, dist, classes=classes, splits=("val",) if val_only else SPLITS)
    if classes is None and val_only:
        _check_val_folders(index, config, checkpoint)
    results, rows = [], None
    for number, crop in enumerate(crop_sizes):
        crop_plan = plan.with_val_crop(crop, config.data.val_resize_size if crop == plan.val_crop_size else None,
                                       config.data.val_resize_ratio)
        loader = build_val_loader(crop_plan, index, batch_size=batch_size)
        started = time.perf_counter()
        with contextlib.closing(loader):  # an error must not leave the workers to their shutdown grace
            result = validate(model, loader, dist, precision, predictions=bool(predictions) and number == 0)
        seconds = time.perf_counter() - started
        results.append({"crop_size": crop, "resize_size": crop_plan.val_resize_size, "top1": result.top1,
                        "top5": result.top5, "num_images": result.num_images,
                        "images_per_sec": result.num_images / max(seconds, 1e-9)})
        if number == 0 and predictions:
            samples = crop_plan.shard(index.val) if index is not None else None
            rows = [(samples[p] if samples is not None else (str(p), -1), row)
                    for p, row in zip(loader.delivered, result.predictions)]
    report = {"model": config.model.name, "checkpoint": str(checkpoint), "weights": weights, "results": results}
    if dist.is_main:
        _print_table(report)
        if output:
            Path(output).write_text(json.dumps(report, indent=2) + "\n")
    if predictions:
        _write_predictions(gather_object(rows, dist), predictions, dist, index.classes if index else None)
    return report


def trained_classes(checkpoint: str) -> list[str] | None:
    """The class names (in label order) a checkpoint of this trainer was trained on; None for other files."""
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - safetensors, official .pth, unreadable: load_weights reports those
        return None
    classes = state.get("provenance", {}).get("classes") if isinstance(state, dict) else None
    return list(classes) if classes else None


def read_class_list(path: str, num_classes: int) -> list[str]:
    """`--classes FILE`: the model's class names in label order, one per line (a `classes.txt`)."""
    try:
        names = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--classes {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if len(names) != num_classes or len(set(names)) != len(names):
        raise UserError(f"--classes {path} names {len(names)} classes ({len(set(names))} distinct); the model has "
                        f"{num_classes}: one name per line, in label order")
    return names


def _check_val_folders(index, config: Config, checkpoint: str) -> None:
    """Weights that do not name their classes, on a val/ folder alone: its folders are labelled in sorted
    order, so with a class missing every later folder would take its neighbour's label (top-1 33% for 92%,
    silently). Refused unless the folders are the whole class list."""
    if index is None or index.layout != "folder" or len(index.classes) >= config.model.num_classes:
        return
    raise UserError(f"{Path(config.data.root) / 'val'} has {len(index.classes)} class folders but the model has "
                    f"{config.model.num_classes} classes and {checkpoint} does not name them: the labels of the "
                    "folders after a missing class would shift; give the class names in label order with "
                    "--classes FILE (one per line), or evaluate a folder with every class")


def _print_table(report: dict) -> None:
    print(f"{report['model']}  {report['checkpoint']}")
    print(f"{'crop':>6} {'resize':>6} {'top-1':>7} {'top-5':>7} {'images':>8} {'img/s':>8}")
    for row in report["results"]:
        print(f"{row['crop_size']:>6} {row['resize_size']:>6} {row['top1']:>7.2f} {row['top5']:>7.2f} "
              f"{row['num_images']:>8} {row['images_per_sec']:>8.1f}")


def _write_predictions(gathered: list | None, path: str, dist: DistInfo, names: list[str] | None) -> None:
    """Per-image top-5 classes (indices and names) and probabilities, ranks' rows in rank order (each
    rank's in list order)."""
    if not dist.is_main:
        return
    name = (lambda i: names[i] if 0 <= i < len(names) else "") if names else (lambda i: "")  # noqa: E731
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "top5_classes", "top5_probs", "label_name", "top5_names"])
        for rank_rows in gathered:
            for (file, label), (classes, probs) in rank_rows:
                writer.writerow([file, label, " ".join(map(str, classes)), " ".join(f"{p:.4f}" for p in probs),
                                 name(label), " ".join(name(c) for c in classes)])
