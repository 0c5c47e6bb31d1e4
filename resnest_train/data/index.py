"""The dataset index: one validated scan of `root/train` and `root/val`, cached and updated file by file.

ImageFolder layout; the class index is the sorted list of train folder names and val must use the same
classes. Each image is checked cheaply (size, JPEG/PNG header and end marker) because a bad file kills a
DALI pipeline with an error that does not name it. Bad files (and directories or broken links named like
images) are skipped and named in one warning; other files are ignored. The scan is I/O bound, so folders
are listed and files checked by a thread pool. The cache (next to the data, or in ~/.cache when the data
is read-only) keeps each file's size, mtime and verdict: a rerun re-checks only files that changed, and an
in-place overwrite (same folder mtime) is seen because the file's own size or mtime changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from resnest_train.errors import UserError
from resnest_train.filescan import IMAGE_EXTENSIONS, decode_error, scan_folder

log = logging.getLogger(__name__)

CACHE_VERSION = 2
SPLITS = ("train", "val")
SCAN_PROCESSES = 16  # class folders in flight at once: I/O bound on network disks (BENCHMARKS.md, "index scan")


class DatasetError(UserError):
    """The dataset folder is missing, empty or inconsistent."""


@dataclass(frozen=True)
class DatasetIndex:
    root: str
    classes: list[str]
    train: list[tuple[str, int]]  # (path relative to root, label)
    val: list[tuple[str, int]]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def _class_folders(folder: Path) -> list[str]:
    if not folder.is_dir():
        raise DatasetError(f"dataset folder not found: {folder} (data.root must hold train/ and val/)")
    hidden = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name.startswith("."))
    if hidden:
        log.warning("not a class: hidden folder(s) %s in %s", ", ".join(hidden), folder)
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _flat_images(folder: Path) -> bool:
    return any(os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS for name in os.listdir(folder))


def _val_only_classes(root: Path, val_classes: list[str], classes: list[str] | None) -> list[str]:
    """Evaluation without train/: the class list a checkpoint names (or val's own folders); every val
    folder must be one of them, a class without a val folder is fine (said in the log)."""
    if classes is None:
        return val_classes
    unknown = [name for name in val_classes if name not in classes]
    if unknown:
        raise DatasetError(f"class folder {root / 'val' / unknown[0]} is not a class of the model (its "
                           f"{len(classes)} classes: {', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''})")
    missing = [name for name in classes if name not in val_classes]
    if missing:
        log.info("%d of the model's classes have no folder in %s (e.g. %s)", len(missing), root / "val", missing[0])
    return list(classes)


def _check_layout(root: Path, classes: list[str] | None = None, splits: tuple[str, ...] = SPLITS) -> list[str]:
    if not root.exists():
        raise DatasetError(f"data.root not found: {root}")
    if not root.is_dir():
        raise DatasetError(f"data.root is a file, not a folder: {root}")
    if "train" not in splits:
        return _val_only_classes(root, _class_folders(root / "val"), classes)
    classes = _class_folders(root / "train")
    if not classes:
        raise DatasetError(f"no class folders in {root / 'train'}")
    val_classes = _class_folders(root / "val")
    if not val_classes and _flat_images(root / "val"):
        raise DatasetError(f"{root / 'val'} holds images but no class folders (the raw ImageNet layout): "
                           "sort it with scripts/prepare_imagenet.py")
    extra = sorted(set(val_classes) - set(classes))
    if extra:
        raise DatasetError(f"val classes missing from train in {root}: {', '.join(extra[:5])}")
    return classes


def scan(root: str | Path) -> DatasetIndex:
    """Index `root` from scratch (no cache)."""
    return scan_files(root)[0]


def scan_files(root: str | Path, previous: dict | None = None, processes: int = SCAN_PROCESSES, *,
               classes: list[str] | None = None, splits: tuple[str, ...] = SPLITS) -> tuple[DatasetIndex, dict]:
    """Index `root`; `previous` maps relative path -> [size, mtime_ns, reason] from an earlier scan, whose
    verdicts are reused for unchanged files. Returns the index and the new per-file table. Class folders
    are scanned by a pool of processes (no GIL between them; many requests in flight on network disks).
    `splits=("val",)`: evaluation's index, val/ alone, labelled by `classes` (a checkpoint's) when given."""
    root = Path(root)
    classes = _check_layout(root, classes, splits)
    folders = [(split, label, name) for split in splits for label, name in enumerate(classes)
               if (root / split / name).is_dir()]
    previous = previous or {}
    known: dict[str, dict] = {}
    for rel, verdict in previous.items():
        folder, _, name = rel.rpartition("/")
        known.setdefault(folder, {})[name] = verdict
    tasks = [(str(root / split / name), known.get(f"{split}/{name}", {})) for split, _, name in folders]
    if processes > 1 and len(tasks) > 1:
        # Fresh interpreters, not forks: a fork of a process running gloo or DALI threads can deadlock.
        with ProcessPoolExecutor(min(processes, len(tasks)), mp_context=multiprocessing.get_context("spawn")) as pool:
            listings = list(pool.map(scan_folder, tasks))
    else:
        listings = [scan_folder(task) for task in tasks]
    table, skipped, lists = {}, [], {"train": [], "val": []}
    for (split, label, name), listing in zip(folders, listings):
        for entry, size, mtime, reason in listing:
            rel = f"{split}/{name}/{entry}"
            table[rel] = [size, mtime, reason]
            if reason:
                skipped.append((str(root / rel), reason))
            else:
                lists[split].append((rel, label))
    _check_splits(root, classes, {split: lists[split] for split in splits})
    return DatasetIndex(str(root), classes, lists["train"], lists["val"], skipped), table


def _check_splits(root: Path, classes: list[str], splits: dict) -> None:
    if "train" in splits:
        used = {label for _, label in splits["train"]}
        empty = [name for label, name in enumerate(classes) if label not in used]
        if empty:
            raise DatasetError(f"class folder {root / 'train' / empty[0]} has no usable images")
    for split, samples in splits.items():
        if not samples:
            raise DatasetError(f"no images in {root / split}")


def _cache_paths(root: Path) -> list[Path]:
    key = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]
    return [root / ".resnest_index.json", Path.home() / ".cache" / "resnest_train" / f"index-{key}.json"]


def _read_cache(root: Path) -> dict:
    for path in _cache_paths(root):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if data.get("version") == CACHE_VERSION and isinstance(data.get("files"), dict):
            return data["files"]
    return {}


def _write_cache(root: Path, table: dict) -> None:
    text = json.dumps({"version": CACHE_VERSION, "files": table})
    for path in _cache_paths(root):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            try:
                tmp.write_text(text)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
            return
        except OSError:
            continue


def load_index(root: str | Path, *, write_cache: bool = True, classes: list[str] | None = None,
               splits: tuple[str, ...] = SPLITS) -> DatasetIndex:
    """The index of `root`: every file listed, only new or changed files checked again."""
    root = Path(root)
    previous = _read_cache(root) if root.is_dir() else {}
    index, table = scan_files(root, previous, classes=classes, splits=splits)
    table = {**previous, **table} if splits != SPLITS else table  # keep the other split's verdicts
    if write_cache and table != previous:
        _write_cache(root, table)
    return index


def warn_skipped(index: DatasetIndex) -> None:
    if index.skipped:
        lines = "\n".join(f"  {path}: {reason}" for path, reason in index.skipped)
        log.warning("skipped %d bad image file(s):\n%s", len(index.skipped), lines)


def find_undecodable(root: str | Path, samples: list[tuple[str, int]], workers: int | None = None) -> list[str]:
    """Fully decode every image and return 'PATH (why)' for those that fail: the slow, thorough check, run
    only after a decoder has failed on a file that passed the cheap header/end check. Threads (PIL decodes
    without the GIL), not forked processes: the caller runs DALI's threads."""
    paths = [str(Path(root) / path) for path, _ in samples]
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        reasons = list(pool.map(decode_error, paths))
    return [f"{path} ({reason})" for path, reason in zip(paths, reasons) if reason]
