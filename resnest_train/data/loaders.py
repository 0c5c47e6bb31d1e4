"""The data contract: one `Loader` protocol, implemented by the DALI, torchvision and synthetic backends.

The runner and the evaluator see only this module (as the package `resnest_train.data`): a `DataPlan`
(plan.py) resolved once, the dataset index loaded by one protocol (rank 0 reads or scans it, every other
rank receives rank 0's copy), and loaders built from them. Which backend runs is the plan's business, never the loop's.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterator
from datetime import timedelta
from typing import Protocol

import numpy as np
import torch

from resnest_train.cluster.agreement import rank0_acts
from resnest_train.cluster.distributed import DistInfo
from resnest_train.data.index import (
    SPLITS,
    DatasetError,
    DatasetIndex,
    index_from_bytes,
    index_to_bytes,
    load_index,
    warn_skipped,
)
from resnest_train.data.order import TrainOrder, shard_groups
from resnest_train.data.plan import DataPlan, build_data_plan, resize_size
from resnest_train.data.shard_caches import follow_order, open_cache
from resnest_train.data.store import is_remote
from resnest_train.data.undecodable import RECORD, Replacement, known_positions, read_record

__all__ = ["TrainLoader", "ValLoader", "DataPlan", "DatasetError", "DatasetIndex", "TrainOrder", "build_data_plan",
           "build_train_loader", "build_val_loader", "check_classes", "known_undecodable", "load_dataset_index",
           "num_train_images", "resize_size", "shard_groups"]

log = logging.getLogger("resnest_train")

# Rank 0 may scan a large dataset while the others wait; this wait must not hit the process group's
# timeout (the broadcast runs in its own group with this one).
INDEX_TIMEOUT = timedelta(hours=4)


class ValLoader(Protocol):
    """What every backend gives evaluation: iterating yields `(images, targets)` on the device, images in the
    model's memory format (`plan.memory_format`), targets int64, this rank's shard of the validation list
    once, in order; `len()` is its batches; `delivered`, after a pass, the positions in the shard of the
    images yielded (an undecodable image is dropped and named, never replaced); `close()` releases the
    backend's workers (a DataLoader's processes would otherwise outlive an error by their shutdown grace)."""

    delivered: list[int]

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def close(self) -> None: ...


class TrainLoader(Protocol):
    """What every backend gives the loop: this process's micro-batches of the framework's data order
    (`order.py`), read from the epoch's cursor (`reader.EpochCursor`).

    - `set_epoch(epoch)` before each epoch; one pass yields the rest of that epoch (all of it, or what
      remains after the step the loader was built from), then stops;
    - `len()` is the micro-batches of a whole epoch, equal on every rank (DDP needs the same steps everywhere);
    - `last_samples`: the training-list positions of the micro-batch last yielded; `last_draws`: their
      augmentation draws (None where the backend draws none: synthetic);
    - `state()`: the position reached (epoch, optimizer step), which a loader built from it continues;
    - `newly_undecodable()`: the training images found undecodable (and replaced) since the last call;
    - `close()` as for `ValLoader`.
    """

    last_samples: torch.Tensor
    last_draws: object

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def set_epoch(self, epoch: int) -> None: ...

    def state(self) -> dict: ...

    def newly_undecodable(self) -> list[str]: ...

    def close(self) -> None: ...


# The backends: where each one's builders live (imported on use: DALI only where it is chosen).
BACKENDS = {
    "synthetic": ("resnest_train.data.synthetic", "build_synthetic_train", "resnest_train.data.synthetic",
                  "build_synthetic_val"),
    "torchvision": ("resnest_train.data.torchvision", "build_torch_train", "resnest_train.data.torchvision",
                    "build_torch_val"),
    "dali": ("resnest_train.data.dali_train", "build_dali_train", "resnest_train.data.dali", "build_dali_val"),
}


def _builder(backend: str, which: str):
    train_module, train_name, val_module, val_name = BACKENDS[backend]
    module, name = (train_module, train_name) if which == "train" else (val_module, val_name)
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as exc:
        if backend != "dali":
            raise
        raise DatasetError(f"data.backend=dali but DALI cannot be imported ({exc}); install "
                           "nvidia-dali-cuda130 (or -cuda120) or use data.backend=torchvision") from None


def load_dataset_index(plan: DataPlan, dist: DistInfo, *, classes: list[str] | None = None,
                       splits: tuple[str, ...] = SPLITS) -> DatasetIndex | None:
    """Rank 0 loads the index (its cache, or a scan) and sends it to every rank, errors included: all ranks
    train on one file list even when their nodes hold different copies of the data (or none). The index
    travels as one compressed buffer of arrays (samples.py: about 8 MB at ImageNet's size), never as
    pickled tuples. Evaluation indexes `splits=("val",)` alone, labelled by the checkpoint's `classes` when
    it names them."""
    if plan.backend == "synthetic":
        return None
    loaded = {}

    def load() -> bytes | None:
        loaded["index"] = load_index(plan.root, classes=classes, splits=splits, patterns=dict(plan.shard_patterns))
        warn_skipped(loaded["index"])
        return index_to_bytes(loaded["index"]) if dist.distributed else None

    buffer = rank0_acts(load, dist, timeout=INDEX_TIMEOUT)
    index = loaded["index"] if dist.is_main else index_from_bytes(buffer)
    if is_remote(plan.root):
        open_cache(plan.root, plan.cache_dir, index.stamps, plan.cache_limit, plan.prefetch_shards)
    return index


def num_train_images(plan: DataPlan, index: DatasetIndex | None) -> int:
    return plan.synthetic_size if plan.backend == "synthetic" else len(index.train)


def check_classes(index: DatasetIndex | None, num_classes: int, root: str) -> None:
    """The data's classes against `model.num_classes`: more is an error, fewer a warning."""
    if index is not None and len(index.classes) > num_classes:
        raise DatasetError(f"{root} has {len(index.classes)} classes but model.num_classes={num_classes}; set "
                           f"model.num_classes={len(index.classes)}")
    if index is not None and len(index.classes) < num_classes:
        log.warning("model.num_classes=%d but %s has %d classes: %d outputs of the classifier never get a "
                    "training image", num_classes, root, len(index.classes), num_classes - len(index.classes))


def known_undecodable(index: DatasetIndex | None, output_dir: str, dist: DistInfo) -> dict[str, list[int]]:
    """The positions in the training and validation lists of the images the run folder records as
    undecodable (undecodable.py), on every rank; rank 0 names them."""
    def read() -> dict[str, list[int]]:
        paths = read_record(output_dir) if index is not None else []
        known = {split: known_positions(getattr(index, split), paths) for split in ("train", "val")} if paths else {}
        if paths:
            log.warning("%d images recorded as undecodable in %s/%s: training replaces them by the next image "
                        "of the list, evaluation leaves them out: %s", len(paths), output_dir, RECORD,
                        ", ".join(paths[:10]) + (", ..." if len(paths) > 10 else ""))
        return known

    return rank0_acts(read, dist)


def build_train_loader(plan: DataPlan, index: DatasetIndex | None, order: TrainOrder, *,
                       start: tuple[int, int] = (0, 0), undecodable: list[int] = ()) -> TrainLoader:
    """This process's micro-batches of `order` from `start` (epoch, optimizer steps done in it).
    `undecodable`: training-list positions known not to decode, replaced without being tried."""
    samples = index.train if index is not None else None
    replacement = Replacement(len(samples) if samples is not None else order.num_samples, undecodable)
    if is_remote(plan.root):
        follow_order(plan.root, samples, order)
    return _builder(plan.backend, "train")(plan, samples, order, start=start, replacement=replacement)


def build_val_loader(plan: DataPlan, index: DatasetIndex | None, *, batch_size: int,
                     undecodable: list[int] = ()) -> ValLoader:
    """This rank's shard of the validation list at `plan.val_crop_size` / `plan.val_resize_size`, without
    the positions `undecodable` (known not to decode: left out, as a failing image is)."""
    shard = None
    if index is not None:
        keep = np.setdiff1d(np.arange(len(index.val)), np.asarray(undecodable, dtype=np.int64))
        shard = plan.shard(index.val.take(keep) if len(undecodable) else index.val)
    return _builder(plan.backend, "val")(plan, shard, batch_size=batch_size)
