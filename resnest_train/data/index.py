"""The dataset index: one validated listing of `root/train` and `root/val`, kept as arrays and reopened in
seconds.

Two layouts. Folders (ImageFolder): the class index is the sorted list of train folder names and val must
use the same classes. Shards: `train/*.tar` and `val/*.tar` in webdataset's format, each sample an image
(`.jpg`/`.jpeg`/`.png`) and a `.cls` member holding its class index (the public ImageNet-1k webdataset
layout); class names from `root/classes.txt` (line i names class i; `scripts/pack_dataset.py` writes it),
else the class indices themselves. Samples keep the order of the sorted shards and their members, so a
folder packed by `pack_dataset.py` has the same training list, position for position.

Each image is checked cheaply (size, JPEG/PNG header and end marker) because a bad file kills a DALI
pipeline with an error that does not name it. Bad files (and directories or broken links named like
images) are skipped and named in one warning; other files are ignored. The listing and its verdicts live in
a cache (index_table.py) that a rerun revalidates by folder and shard stamps.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from resnest_train.data.filescan import IMAGE_EXTENSIONS, ScanError
from resnest_train.data.index_table import Chunk, Table, read_cache, scan_units
from resnest_train.data.index_table import write_cache as write_table
from resnest_train.data.samples import SampleList, pack, unpack
from resnest_train.data.store import is_remote
from resnest_train.data.store import join as join_url
from resnest_train.data.store_index import remote_table
from resnest_train.errors import UserError

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
CLASSES_FILE = "classes.txt"


class DatasetError(UserError):
    """The dataset folder is missing, empty or inconsistent."""


@dataclass(frozen=True)
class DatasetIndex:
    root: str
    classes: list[str]
    train: SampleList  # (path relative to root, label) per sample; `shard.tar:member` inside a shard
    val: SampleList
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    stamps: dict[str, tuple[int, int]] = field(default_factory=dict)  # shard -> (mtime or ETag digest, size)

    @property
    def layout(self) -> str:
        return self.val.kind


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


def _shard_files(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.suffix == ".tar" and p.is_file())


def _is_sharded(root: Path, splits: tuple[str, ...]) -> bool:
    """Shards: the first split holds `.tar` files and no class folders."""
    folder = root / splits[0]
    return bool(_shard_files(folder)) and not any(p.is_dir() and not p.name.startswith(".") for p in folder.iterdir())


def _join(root: str | Path, *parts: str) -> str:
    """A path under the data root, as messages name it (a URL keeps its `//`)."""
    return join_url(str(root), *parts) if is_remote(str(root)) else str(Path(root).joinpath(*parts))


def _classes_lines(root: Path) -> list[str] | None:
    path = root / CLASSES_FILE
    return _read_classes_file(path) if path.is_file() else None


def _shard_classes(root: str | Path, names: list[str] | None, classes: list[str] | None,
                   table: Table) -> tuple[list[str], np.ndarray | None]:
    """The class names of a shard dataset and, where the `.cls` indices are not already indices into them,
    the map from a `.cls` index to one. A `.cls` index means line i of `root/classes.txt`; the caller's
    `classes` (a checkpoint's, or `--classes`) are the model's labels, which the lines are mapped onto by
    name, as class folders are. Without `classes.txt`, the indices are the caller's labels (or the classes
    are named by their index)."""
    path, (top, where) = _join(root, CLASSES_FILE), _largest_label(table)
    if names is not None:
        if top >= len(names):
            raise DatasetError(f"{path} names {len(names)} classes but {_join(root, where)} has class index {top}: "
                               f"it must name every class index (line i names class i)")
        if classes is None or names == list(classes):
            return names, None
        unknown = [name for name in names if name not in classes]
        if unknown:
            raise DatasetError(f"class {unknown[0]!r} of {path} is not a class of the model (its {len(classes)} "
                               f"classes: {', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''})")
        log.info("%s orders the classes differently from the model: labels mapped by class name", path)
        return list(classes), np.array([classes.index(name) for name in names], dtype=np.int64)
    if classes is not None:
        if top >= len(classes):
            raise DatasetError(f"{_join(root, where)} has class index {top} but the model has {len(classes)} classes "
                               f"(and {root} has no {CLASSES_FILE})")
        return list(classes), None
    log.info("no %s in %s: the classes are named by their index", CLASSES_FILE, root)
    return [str(i) for i in range(top + 1)], None


def _largest_label(table: Table) -> tuple[int, str]:
    """The largest `.cls` index of the table and the sample that holds it (-1, "" where none)."""
    tops = [int(chunk.columns["label"].max()) if len(chunk.lengths) else -1 for chunk in table.chunks]
    if max(tops, default=-1) < 0:
        return -1, ""
    unit = int(np.argmax(tops))
    chunk = table.chunks[unit]
    return tops[unit], f"{table.units[unit]}:{chunk.names()[int(np.argmax(chunk.columns['label']))]}"


def _read_classes_file(path: Path) -> list[str]:
    try:
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from None


def _units(root: Path, splits: tuple[str, ...], classes: list[str], sharded: bool) -> list[str]:
    if sharded:
        units = [f"{split}/{name}" for split in splits for name in _shard_files(root / split)]
        for split in splits:
            if not any(unit.startswith(f"{split}/") for unit in units):
                raise DatasetError(f"no shards (*.tar) in {root / split}")
        return units
    return [f"{split}/{name}" for split in splits for name in classes if (root / split / name).is_dir()]


def scan_files(root: str | Path, cached: Table | None = None, processes: int | None = None, *,
               classes: list[str] | None = None, splits: tuple[str, ...] = SPLITS,
               recheck: bool = False, patterns: dict[str, str] | None = None) -> tuple[DatasetIndex, Table]:
    """Index `root`, reusing what `cached` (an earlier scan's table) knows of unchanged folders and shards
    (`recheck`: of nothing, every file is checked again). Returns the index and the new table.
    `splits=("val",)`: evaluation's index, val/ alone, labelled by `classes` (a checkpoint's) when given.
    A remote root (store.py) holds shards, listed or named by `patterns` (split -> brace pattern)."""
    if is_remote(str(root)):
        table, names = remote_table(str(root), splits, patterns or {}, cached, recheck)
        classes, label_map = _shard_classes(str(root), names, classes, table)
        index = _build(str(root), classes, table, True, label_map)
        _check_splits(str(root), index, splits)
        return index, table
    root = Path(root)
    sharded = root.is_dir() and _is_sharded(root, splits)
    folder_classes = None if sharded else _check_layout(root, classes, splits)
    units = _units(root, splits, folder_classes or [], sharded)
    kwargs = {} if processes is None else {"processes": processes}
    try:
        table = scan_units(root, units, sharded, cached, recheck=recheck, **kwargs)
    except ScanError as exc:
        raise DatasetError(str(exc)) from None
    classes, label_map = _shard_classes(root, _classes_lines(root), classes, table) if sharded \
        else (folder_classes, None)
    index = _build(root, classes, table, sharded, label_map)
    _check_splits(root, index, splits)
    return index, table


def _build(root: str | Path, classes: list[str], table: Table, sharded: bool,
           label_map: np.ndarray | None) -> DatasetIndex:
    """The index from the scan table; `label_map` turns a shard's `.cls` index into a label."""
    label_of = {name: i for i, name in enumerate(classes)}
    lists, skipped = {}, []
    for split in SPLITS:
        parts = [(unit, chunk) for unit, chunk in zip(table.units, table.chunks) if unit.startswith(f"{split}/")]
        pieces = []
        for dir_id, (unit, chunk) in enumerate(parts):
            n = len(chunk.lengths)
            labels = chunk.columns["label"] if sharded else np.full(n, label_of[unit.split("/", 1)[1]])
            if label_map is not None:
                labels = np.where(labels >= 0, label_map[np.clip(labels, 0, None)], labels)
            reasons = chunk.columns["reason"].copy()
            out_of_range = (reasons < 0) & ((labels < 0) | (labels >= len(classes)))
            if out_of_range.any():  # a .cls beyond the class list: named, like any other unusable sample
                chunk = Chunk(chunk.stamp, chunk.blob, chunk.lengths, chunk.columns,
                              [*chunk.texts, f"class index outside 0..{len(classes) - 1}"])
                reasons[out_of_range] = len(chunk.texts) - 1
            if (reasons >= 0).any():
                names = chunk.names()
                skipped += [(_entry_path(_join(root, unit), names[i], sharded), chunk.texts[reasons[i]])
                            for i in np.flatnonzero(reasons >= 0).tolist()]
            pieces.append((dir_id, chunk, labels, reasons < 0))
        lists[split] = _sample_list("shards" if sharded else "folder", [u for u, _ in parts], pieces)
    stamps = {unit: tuple(chunk.stamp) for unit, chunk in zip(table.units, table.chunks)} if sharded else {}
    return DatasetIndex(str(root), classes, lists["train"], lists["val"], skipped, stamps)


def _entry_path(unit: str, name: str, sharded: bool) -> str:
    """A skipped entry's path: `shard.tar:member`, `folder/file`, or the shard itself (name "": it is not
    whole, filescan.scan_shard)."""
    return f"{unit}:{name}" if sharded and name else f"{unit}/{name}" if name else str(unit)


def _sample_list(kind: str, dirs: list[str], pieces: list) -> SampleList:
    """The usable entries of each unit's chunk, concatenated in unit order."""
    cat = (lambda parts, dtype: np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype))
    keep = [good for _, _, _, good in pieces]
    lengths = cat([chunk.lengths[good] for (_, chunk, _, _), good in zip(pieces, keep)], np.int64)
    blob = cat([chunk.blob[np.repeat(good, chunk.lengths)] for (_, chunk, _, _), good in zip(pieces, keep)], np.uint8)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    dir_ids = cat([np.full(int(good.sum()), d) for (d, _, _, _), good in zip(pieces, keep)], np.int32)
    labels = cat([labels[good] for (_, _, labels, good) in pieces], np.int32)
    starts = sizes = None
    if kind == "shards":
        starts = cat([chunk.columns["start"][good] for (_, chunk, _, good) in pieces], np.int64)
        sizes = cat([chunk.columns["size"][good] for (_, chunk, _, good) in pieces], np.int64)
    return SampleList(kind, dirs, dir_ids, blob, offsets, labels, starts, sizes)


def _check_splits(root: str | Path, index: DatasetIndex, splits: tuple[str, ...]) -> None:
    if "train" in splits:
        used = set(np.unique(index.train.labels).tolist())
        empty = [name for label, name in enumerate(index.classes) if label not in used]
        if empty:
            where = _join(root, "train", empty[0]) if index.layout == "folder" \
                else f"class {empty[0]} in {_join(root, 'train')}"
            raise DatasetError(f"class folder {where} has no usable images" if index.layout == "folder"
                               else f"{where} has no usable images")
    for split in splits:
        if not len(getattr(index, split)):
            raise DatasetError(f"no images in {_join(root, split)}")


def scan(root: str | Path) -> DatasetIndex:
    """Index `root` from scratch (no cache)."""
    return scan_files(root)[0]


def load_index(root: str | Path, *, write_cache: bool = True, classes: list[str] | None = None,
               splits: tuple[str, ...] = SPLITS, recheck: bool = False,
               patterns: dict[str, str] | None = None) -> DatasetIndex:
    """The index of `root`: unchanged folders and shards from the cache, the others listed again."""
    root = str(root) if is_remote(str(root)) else Path(root)
    cached = read_cache(root) if isinstance(root, str) or root.is_dir() else None
    index, table = scan_files(root, cached, classes=classes, splits=splits, recheck=recheck, patterns=patterns)
    if cached is not None and splits != SPLITS:  # keep the other split's units
        kept = [(u, c) for u, c in zip(cached.units, cached.chunks) if u not in set(table.units)]
        table = Table([u for u, _ in kept] + table.units, [c for _, c in kept] + table.chunks)
    if write_cache and (cached is None or _changed(cached, table)):
        write_table(root, table)
    return index


def _changed(cached: Table, table: Table) -> bool:
    if cached.units != table.units:
        return True
    return any(a is not b for a, b in zip(cached.chunks, table.chunks))

def warn_skipped(index: DatasetIndex) -> None:
    if index.skipped:
        lines = "\n".join(f"  {path}: {reason}" for path, reason in index.skipped)
        log.warning("skipped %d bad image file(s):\n%s", len(index.skipped), lines)


def index_to_bytes(index: DatasetIndex) -> bytes:
    """The index as the one compressed buffer ranks receive."""
    meta = {"root": index.root, "classes": index.classes, "skipped": index.skipped, "kind": index.val.kind,
            "stamps": index.stamps}
    return pack(meta, {"train": index.train, "val": index.val})


def index_from_bytes(data: bytes) -> DatasetIndex:
    meta, lists = unpack(data, lambda meta: meta["kind"])
    return DatasetIndex(meta["root"], meta["classes"], lists["train"], lists["val"],
                        [tuple(pair) for pair in meta["skipped"]],
                        {unit: tuple(stamp) for unit, stamp in meta.get("stamps", {}).items()})


def main(argv: list[str] | None = None) -> int:
    """`python -m resnest_train.data.index ROOT [--recheck]`: build or refresh the index cache of ROOT;
    `--recheck` checks every file again (a file overwritten in place keeps its folder's stamp, so a warm
    open does not look at it)."""
    import argparse
    parser = argparse.ArgumentParser(prog="python -m resnest_train.data.index", description=main.__doc__)
    parser.add_argument("root")
    parser.add_argument("--recheck", action="store_true", help="check every file, not only changed folders")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        index = load_index(args.root, recheck=args.recheck)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    warn_skipped(index)
    print(f"{args.root}: {index.layout}, {len(index.classes)} classes, {len(index.train)} train and "
          f"{len(index.val)} val images, {len(index.skipped)} skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
