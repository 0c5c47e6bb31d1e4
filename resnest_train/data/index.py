"""The dataset index: one validated scan of `root/train` and `root/val`, cached for every rank.

ImageFolder layout; the class index is the sorted list of train folder names and val must use the same
classes. Each image is checked cheaply (size, JPEG/PNG header and end marker) because a bad file kills a
DALI pipeline with an error that does not name it. Bad files are skipped and named in one warning; non-image
files are ignored. The result is cached next to the data (or in ~/.cache when the data is read-only) under
a fingerprint of the folders' mtimes, so a large dataset is walked once, not once per process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from resnest_train.errors import UserError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png"}
CACHE_VERSION = 1


class DatasetError(UserError):
    """The dataset folder is missing, empty or inconsistent."""


@dataclass(frozen=True)
class DatasetIndex:
    root: str
    classes: list[str]
    train: list[tuple[str, int]]  # (path relative to root, label)
    val: list[tuple[str, int]]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    def files(self, split: str) -> list[tuple[str, int]]:
        return self.train if split == "train" else self.val


def check_image(path: Path) -> str | None:
    """Return why `path` is not a usable image, or None. Reads only its first and last bytes."""
    try:
        size = path.stat().st_size
        if size == 0:
            return "empty file"
        with path.open("rb") as handle:
            head = handle.read(8)
            handle.seek(max(0, size - 64))
            tail = handle.read(64)
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    if head[:3] == b"\xff\xd8\xff":
        # Some encoders pad after the end-of-image marker, so look for it near the end.
        return None if b"\xff\xd9" in tail else "truncated JPEG (no end-of-image marker)"
    if head == b"\x89PNG\r\n\x1a\n":
        return None if b"IEND" in tail else "truncated PNG (no IEND chunk)"
    return "not a JPEG or PNG image"


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _scan_split(root: Path, split: str, classes: list[str], skipped: list) -> list[tuple[str, int]]:
    samples = []
    for label, name in enumerate(classes):
        folder = root / split / name
        if not folder.is_dir():
            continue
        good = 0
        for path in _image_files(folder):
            reason = check_image(path)
            if reason:
                skipped.append((str(path), reason))
                continue
            samples.append((str(path.relative_to(root)), label))
            good += 1
        if good == 0 and split == "train":
            raise DatasetError(f"class folder {folder} has no usable images")
    if not samples:
        raise DatasetError(f"no images in {root / split}")
    return samples


def _class_folders(folder: Path) -> list[str]:
    if not folder.is_dir():
        raise DatasetError(f"dataset folder not found: {folder} (data.root must hold train/ and val/)")
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan(root: str | Path) -> DatasetIndex:
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"data.root not found: {root}")
    classes = _class_folders(root / "train")
    if not classes:
        raise DatasetError(f"no class folders in {root / 'train'}")
    extra = sorted(set(_class_folders(root / "val")) - set(classes))
    if extra:
        raise DatasetError(f"val classes missing from train in {root}: {', '.join(extra[:5])}")
    skipped: list[tuple[str, str]] = []
    train = _scan_split(root, "train", classes, skipped)
    val = _scan_split(root, "val", classes, skipped)
    return DatasetIndex(str(root), classes, train, val, skipped)


def fingerprint(root: Path) -> str:
    """Changes when a file is added, removed or renamed in any class folder (their mtimes change)."""
    digest = hashlib.sha1(str(root.resolve()).encode())
    for split in ("train", "val"):
        top = root / split
        if not top.is_dir():
            continue
        for entry in sorted(os.scandir(top), key=lambda e: e.name):
            if entry.is_dir():
                digest.update(f"{split}/{entry.name}:{entry.stat().st_mtime_ns}".encode())
        digest.update(f"{split}:{top.stat().st_mtime_ns}".encode())
    return digest.hexdigest()


def _cache_paths(root: Path) -> list[Path]:
    key = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]
    return [root / ".resnest_index.json", Path.home() / ".cache" / "resnest_train" / f"index-{key}.json"]


def _read_cache(root: Path, stamp: str) -> DatasetIndex | None:
    for path in _cache_paths(root):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if data.get("version") == CACHE_VERSION and data.get("fingerprint") == stamp:
            return DatasetIndex(str(root), data["classes"], [tuple(s) for s in data["train"]],
                                [tuple(s) for s in data["val"]], [tuple(s) for s in data["skipped"]])
    return None


def _write_cache(index: DatasetIndex, stamp: str) -> None:
    data = {"version": CACHE_VERSION, "fingerprint": stamp, "classes": index.classes, "train": index.train,
            "val": index.val, "skipped": index.skipped}
    for path in _cache_paths(Path(index.root)):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data))
            os.replace(tmp, path)
            return
        except OSError:
            continue


def load_index(root: str | Path, *, write_cache: bool = True) -> DatasetIndex:
    """The index of `root`, from the cache when the folders have not changed since it was written."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"data.root not found: {root}")
    stamp = fingerprint(root)
    index = _read_cache(root, stamp)
    if index is None:
        index = scan(root)
        if write_cache:
            _write_cache(index, stamp)
    return index


def warn_skipped(index: DatasetIndex) -> None:
    if index.skipped:
        lines = "\n".join(f"  {path}: {reason}" for path, reason in index.skipped)
        log.warning("skipped %d bad image file(s):\n%s", len(index.skipped), lines)


def _decode_error(path: str) -> str | None:
    try:
        with Image.open(path) as image:
            image.load()
    except Exception as exc:  # noqa: BLE001 - PIL reports broken data in several exception types
        return f"cannot decode ({exc})"
    return None


def find_undecodable(root: str | Path, samples: list[tuple[str, int]], workers: int | None = None) -> list[str]:
    """Fully decode every image (in parallel) and return the paths that fail: the slow, thorough check,
    run only after a decoder has failed on a file that passed the cheap header/end check."""
    paths = [str(Path(root) / path) for path, _ in samples]
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        reasons = list(pool.map(_decode_error, paths, chunksize=64))
    return [path for path, reason in zip(paths, reasons) if reason]
