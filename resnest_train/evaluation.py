"""evaluate.py's work: a checkpoint measured at one or more crop sizes, every image counted exactly once.

For each crop: resize the shorter side to `data.val_resize_size`, or ceil(crop / data.val_resize_ratio)
(224 -> 256), center crop, normalize; with `--flip`, each image is also scored with its horizontal mirror
(the mean of the two softmaxes: engine.py) and still counted once. Each rank reads its own shard of the val
list with no padding and the counts are summed across ranks, so the numbers are identical on any number of
processes. The dataset
index and the model come from the same builders as the trainer's; `--predictions` are collected during
the first crop's pass, not by a second one.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from resnest_train.checkpoint.format import classes_of
from resnest_train.cluster.distributed import DistInfo, all_reduce_sum, cleanup, gather_object, setup_distributed
from resnest_train.config import Config
from resnest_train.data import build_data_plan, build_val_loader, load_dataset_index
from resnest_train.data.index import SPLITS
from resnest_train.errors import UserError
from resnest_train.labels import RealLabels, check_val_folders, class_index_names, read_class_list
from resnest_train.recipe.engine import resolve_precision, validate
from resnest_train.run.reporting import configure_logging
from resnest_train.run.wrapping import build_model, load_weights, place

log = logging.getLogger("resnest_train")


@dataclass(frozen=True)
class EvalOptions:
    """evaluate.py's options beyond the config (cli.py documents each)."""

    crop_sizes: list[int] | None = None
    output: str | None = None
    predictions: str | None = None
    batch_size: int | None = None
    classes_file: str | None = None
    weights: str = "model"
    real_labels: str | None = None
    class_index_folders: bool = False
    flip: bool = False


def evaluate_checkpoint(config: Config, checkpoint: str, options: EvalOptions = EvalOptions()) -> dict:
    dist = setup_distributed(config.train.device)
    configure_logging(dist)
    try:
        crop_sizes = options.crop_sizes or [config.data.val_crop_size]
        if options.predictions and len(crop_sizes) > 1:
            raise UserError(f"--predictions takes one crop size (got --crop-size {' '.join(map(str, crop_sizes))}); "
                            "run once per crop for the predictions of each")
        if options.classes_file and options.class_index_folders:
            raise UserError("--classes and --class-index-folders both name the classes: give one")
        for path in (options.output, options.predictions):
            if path:
                _check_output(Path(path))
        return _measure(config, dist, checkpoint, crop_sizes, options)
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


def _class_names(config: Config, checkpoint: str, options: EvalOptions) -> list[str] | None:
    if options.class_index_folders:
        return class_index_names(config.model.num_classes)
    if options.classes_file:
        return read_class_list(options.classes_file, config.model.num_classes)
    return trained_classes(checkpoint)


def _load_index(config: Config, plan, dist: DistInfo, checkpoint: str, options: EvalOptions):
    """The validation list, labelled by the class names when known (val/ alone is then read, each folder by
    its name; a folder that is not one of them is an error); other weights take train/'s classes, or
    val/'s without it."""
    classes = _class_names(config, checkpoint, options)
    val_only = classes is not None or not (Path(config.data.root) / "train").is_dir()
    index = load_dataset_index(plan, dist, classes=classes, splits=("val",) if val_only else SPLITS)
    if classes is None and val_only:
        check_val_folders(index, config.data.root, config.model.num_classes, checkpoint)
    return index


def _measure(config: Config, dist: DistInfo, checkpoint: str, crop_sizes: list[int], options: EvalOptions) -> dict:
    model = build_model(config.model, pretrained=False)
    load_weights(model, checkpoint, "--checkpoint", f"{config.model.name} ({config.model.num_classes} classes)",
                 weights=options.weights)
    model = place(model, dist, channels_last=config.train.channels_last).eval()
    precision = resolve_precision(config.train.amp, dist.device)
    plan = build_data_plan(config, dist)
    index = _load_index(config, plan, dist, checkpoint, options)
    real = None
    if options.real_labels and index is not None:
        real = RealLabels(options.real_labels, index.val, config.model.num_classes)
    results, rows = [], None
    for number, crop in enumerate(crop_sizes):
        crop_plan = plan.with_val_crop(crop, config.data.val_resize_size if crop == plan.val_crop_size else None,
                                       config.data.val_resize_ratio)
        loader = build_val_loader(crop_plan, index, batch_size=options.batch_size or config.train.batch_size)
        keep = real is not None or (bool(options.predictions) and number == 0)
        started = time.perf_counter()
        with contextlib.closing(loader):  # an error must not leave the workers to their shutdown grace
            result = validate(model, loader, dist, precision, predictions=keep, flip=options.flip)
        seconds = time.perf_counter() - started
        results.append({"crop_size": crop, "resize_size": crop_plan.val_resize_size, "top1": result.top1,
                        "top5": result.top5, "num_images": result.num_images,
                        "images_per_sec": result.num_images / max(seconds, 1e-9)})
        samples = crop_plan.shard(index.val) if index is not None else None
        if real is not None:
            results[-1].update(_real_scores(real, samples, loader.delivered, result.predictions, dist))
        if number == 0 and options.predictions:
            rows = [(samples[p] if samples is not None else (str(p), -1), row)
                    for p, row in zip(loader.delivered, result.predictions)]
    report = {"model": config.model.name, "checkpoint": str(checkpoint), "weights": options.weights,
              "flip": options.flip, "results": results}
    if dist.is_main:
        _print_table(report)
        if options.output:
            Path(options.output).write_text(json.dumps(report, indent=2) + "\n")
    if options.predictions:
        _write_predictions(gather_object(rows, dist), options.predictions, dist, index.classes if index else None)
    return report


def _real_scores(real: RealLabels, samples, delivered: list[int], predictions: list, dist: DistInfo) -> dict:
    counts = real.counts([samples.path(p) for p in delivered], [top5 for top5, _ in predictions], dist.device)
    correct1, correct5, judged = all_reduce_sum(counts, dist).tolist()
    return {"real_top1": 100.0 * correct1 / max(judged, 1), "real_top5": 100.0 * correct5 / max(judged, 1),
            "real_images": int(judged)}


def trained_classes(checkpoint: str) -> list[str] | None:
    """The class names (in label order) a checkpoint of this trainer was trained on; None for other files."""
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - safetensors, official .pth, unreadable: load_weights reports those
        return None
    return classes_of(state)


def _print_table(report: dict) -> None:
    real = "real_top1" in report["results"][0]
    print(f"{report['model']}  {report['checkpoint']}" + ("  (EMA weights)" if report["weights"] == "ema" else "")
          + ("  (test-time flip)" if report["flip"] else ""))
    print(f"{'crop':>6} {'resize':>6} {'top-1':>7} {'top-5':>7}" + (f" {'ReaL-1':>7} {'ReaL-5':>7}" if real else "")
          + f" {'images':>8} {'img/s':>8}")
    for row in report["results"]:
        scores = f" {row['real_top1']:>7.2f} {row['real_top5']:>7.2f}" if real else ""
        print(f"{row['crop_size']:>6} {row['resize_size']:>6} {row['top1']:>7.2f} {row['top5']:>7.2f}{scores} "
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
