"""The index of a remote data root's shards (index.py's scan, for `s3://`, `gs://`, `http(s)://` roots).

Which shards: a split's brace pattern where one is given (`data.train_shards`, as webdataset writes them:
`imagenet1k-train-{0000..1023}.tar`), else the store's listing of `root/<split>/` (S3 and GCS list with
sizes and ETags; an HTTP server lists where it serves an index page), else the file names of the split in
`root/_info.json` (the public ImageNet-1k webdataset copy's; `validation` for val). Each shard's stamp is
(a digest of its ETag, or of its modification time, size): a rerun compares the listed stamps with the
cached ones and indexes again only the shards that changed. A shard is indexed by byte ranges of its tar
headers (store.RangeReader: about one request per member, never a full download), several at once.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

from braceexpand import braceexpand

from resnest_train.data import store
from resnest_train.data.filescan import ScanError, scan_tar
from resnest_train.data.index_table import Chunk, Table
from resnest_train.errors import UserError

INFO_FILE = "_info.json"
INFO_SPLITS = {"train": ("train",), "val": ("val", "validation")}
SCAN_THREADS = 64  # shards indexed at once: each is a sequence of small range requests, bound by latency


class RemoteDatasetError(UserError):
    """A remote root whose shards cannot be found or indexed."""


def _info_names(root: str, split: str) -> list[str] | None:
    text = store.read_text(store.join(root, INFO_FILE))
    if text is None:
        return None
    try:
        splits = json.loads(text)["splits"]
        entry = next(splits[name] for name in INFO_SPLITS[split] if name in splits)
        return [name.rsplit("/", 1)[-1] for name in entry["filenames"]]
    except (ValueError, KeyError, TypeError, StopIteration):
        raise RemoteDatasetError(f"{store.join(root, INFO_FILE)} does not list the {split} split's file names "
                                 "(splits.<split>.filenames)") from None


def split_shards(root: str, split: str, pattern: str | None) -> dict[str, tuple[int, int]]:
    """name -> stamp of the split's shards."""
    folder = store.join(root, split)
    if pattern:
        names = sorted(braceexpand(pattern))
    else:
        listed = {name: info for name, info in store.listing(folder).items() if name.endswith(".tar")}
        if listed and all(info.get("size") is not None for info in listed.values()):
            return {name: store.stamp_of(info) for name, info in sorted(listed.items())}
        names = sorted(listed) or _info_names(root, split) or []
    if not names:
        key = "train_shards" if split == "train" else "val_shards"
        raise RemoteDatasetError(f"no shards (*.tar) found in {folder} (a remote data.root holds shards; folders "
                                 f"of images are read from a local disk): where the store cannot list them "
                                 f"(https), name them with data.{key}, e.g. 'shard-{{0000..0099}}.tar', or "
                                 f"in {store.join(root, INFO_FILE)}")
    urls = [store.join(folder, name) for name in names]
    return dict(zip(names, store.stamps(urls)))


def _scan(url: str, size: int) -> list[tuple]:
    """A shard's rows, as scan_unit gives a local shard's."""
    try:
        samples = scan_tar(store.RangeReader(url, size))
    except ScanError as exc:
        raise RemoteDatasetError(str(exc)) from None
    return [(name, size_, -1, start, label, reason) for name, start, size_, label, reason in samples]


def remote_table(root: str, splits: tuple[str, ...], patterns: dict[str, str], cached: Table | None,
                 recheck: bool = False) -> tuple[Table, list[str] | None]:
    """The scan table of the remote shards of `splits` (unchanged ones from `cached`) and the lines of
    `root/classes.txt` (None without one)."""
    units, stamps = [], {}
    for split in splits:
        for name, stamp in split_shards(root, split, patterns.get(split)).items():
            units.append(f"{split}/{name}")
            stamps[units[-1]] = stamp
    chunks = {}
    for unit in units:
        old = cached.chunk(unit) if cached is not None else None
        if old is not None and not recheck and tuple(old.stamp) == stamps[unit]:
            chunks[unit] = old
    todo = [unit for unit in units if unit not in chunks]
    with ThreadPoolExecutor(max_workers=max(1, min(SCAN_THREADS, len(todo)))) as pool:
        rows = list(pool.map(lambda unit: _scan(store.join(root, unit), stamps[unit][1]), todo))
    for unit, unit_rows in zip(todo, rows):
        chunks[unit] = Chunk.of(stamps[unit], unit_rows)
    text = store.read_text(store.join(root, "classes.txt"))
    names = None if text is None else [line.strip() for line in text.splitlines() if line.strip()]
    return Table(units, [chunks[unit] for unit in units]), names
