#!/usr/bin/env python
"""Pack a prepared dataset folder (`train/<class>/*.jpg`, `val/<class>/*.jpg`) into webdataset tar shards.

    pack_dataset.py --root FOLDER --out DIR [--shard-size BYTES] [--shuffle SEED]

writes `DIR/train/train-000000.tar ...`, `DIR/val/val-000000.tar ...` and `DIR/classes.txt` (line i names
class i). Each sample is two members, `<class>/<file stem>.<ext>` (the image's bytes as they are) and
`<class>/<file stem>.cls` (its class index as text): the layout of the public ImageNet-1k webdataset copy,
which the framework reads as well. Dots in a stem become underscores (webdataset's key ends at the first dot),
and a file whose key an earlier one already has (`x.JPG` after `x.jpg`, `n.png` after `n.jpg`) is packed as
`<key>_<n>`, so every image of the folder is a sample of the shards. Without `--shuffle` samples follow the
folder's training list (classes sorted, files sorted in each), so the shards hold the same list position for
position: a run on them reads the same images in the same micro-batches as a run on the folder. Bad files
are skipped and named, as the trainer's index does. The output is deterministic (members sorted as above,
mtime 0, no owner names); a shard is closed once it holds `--shard-size` bytes (default 256 MB, where
webdataset's guidance for streaming lies).

`--shuffle SEED` packs the training images in a random order drawn from SEED (numpy's `default_rng(SEED)`:
the same SEED gives the same shards, byte for byte), for `data.shuffle=shards`. That order shuffles images
only within a window of a few shards (data/order.py), so shards packed class by class would give each window,
and every batch drawn from it, a handful of classes; shuffled shards each hold images of many classes. The
training list is then in another order than the folder's, which a checkpoint counts as another training set
(checkpoint/provenance.py). Validation is packed in the folder's order either way: evaluation counts each
image once, in any order.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from resnest_train.data.index import CLASSES_FILE, DatasetError, load_index, warn_skipped  # noqa: E402
from resnest_train.data.sample_read import read_sample  # noqa: E402

DEFAULT_SHARD_SIZE = 256 * 2**20


def _member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    return info, io.BytesIO(data)


def _base_key(path: str) -> str:
    """`train/<class>/<stem>.<ext>` -> `<class>/<stem>` with the stem's dots as underscores: webdataset's key
    ends at the first dot of a member's name, so a dot left in would cut the key short."""
    _, class_name, file_name = path.split("/", 2)
    return f"{class_name}/{os.path.splitext(file_name)[0].replace('.', '_')}"


def sample_keys(samples) -> list[str]:
    """Each sample's webdataset key, distinct within the split. Names that share a base key (`a.b.jpg` and
    `a_b.jpg`, `x.JPG` and `x.jpg`, `n.jpg` and `n.png`) would be one sample to every reader: the first in
    the folder's order keeps it, each later one takes the first `<key>_<n>` (n = 2, 3, ...) that no file
    of the split has as its own, so the same folder always packs to the same names."""
    keys = [_base_key(samples.path(i)) for i in range(len(samples))]
    taken, used, unique = set(keys), set(), []
    for key in keys:
        if key in used:
            n = 2
            while f"{key}_{n}" in taken:
                n += 1
            key = f"{key}_{n}"
            taken.add(key)
        used.add(key)
        unique.append(key)
    return unique


def _sample_members(samples, i: int, key: str, data: bytes) -> list[tuple[tarfile.TarInfo, io.BytesIO]]:
    """Sample i under `key` -> members `<key>.<ext>` (lower case) and `<key>.cls`."""
    ext = os.path.splitext(samples.path(i))[1].lower()
    return [_member(f"{key}{ext}", data), _member(f"{key}.cls", f"{int(samples.labels[i])}\n".encode())]


def pack_split(root: Path, samples, out: Path, split: str, shard_size: int, order=None) -> list[Path]:
    """Write `samples` into `out/split/split-NNNNNN.tar`, each closed past `shard_size` bytes, in the list's
    order or `order` (positions in the list); returns them. Keys are given in the list's order either way."""
    folder = out / split
    folder.mkdir(parents=True, exist_ok=True)
    keys = sample_keys(samples)
    written, tar, size = [], None, 0
    for i in (range(len(samples)) if order is None else order):
        if tar is None or size >= shard_size:
            if tar is not None:
                tar.close()
            written.append(folder / f"{split}-{len(written):06d}.tar")
            tar, size = tarfile.open(written[-1], "w", format=tarfile.GNU_FORMAT), 0
        data = read_sample(root, samples, i)
        for info, payload in _sample_members(samples, i, keys[i], data):
            tar.addfile(info, payload)
        size += len(data) + 1024
    if tar is not None:
        tar.close()
    for stale in sorted(set(folder.glob(f"{split}-*.tar")) - set(written)):  # an earlier, larger packing
        stale.unlink()
    renamed = sum(key != _base_key(samples.path(i)) for i, key in enumerate(keys))
    if renamed:
        print(f"{folder}: {renamed} file name(s) shared a webdataset key with an earlier file and were packed as "
              "<key>_<n>")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="a prepared folder holding train/ and val/ class folders")
    parser.add_argument("--out", required=True, help="where train/, val/ and classes.txt are written")
    parser.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="bytes per shard (about)")
    parser.add_argument("--shuffle", type=int, metavar="SEED",
                        help="pack the training images in a random order from SEED (the same SEED, the same shards) "
                             "for data.shuffle=shards, which shuffles only within a window of a few shards: "
                             "class-sorted shards would give each window and batch a few classes. Default: the "
                             "folder's order (classes sorted)")
    args = parser.parse_args(argv)
    root, out = Path(args.root), Path(args.out)
    for name, value, low in (("--shard-size", args.shard_size, 1), ("--shuffle", args.shuffle, 0)):
        if value is not None and value < low:
            print(f"error: {name} must be {'positive' if low else 'non-negative'}, got {value}", file=sys.stderr)
            return 2
    try:
        if out.resolve() == root.resolve():
            raise DatasetError(f"--out {out} is the folder being packed; name another")
        index = load_index(root)
        if index.layout != "folder":
            raise DatasetError(f"{root} already holds shards")
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    warn_skipped(index)
    out.mkdir(parents=True, exist_ok=True)
    (out / CLASSES_FILE).write_text("".join(f"{name}\n" for name in index.classes))
    for split in ("train", "val"):
        shuffled = split == "train" and args.shuffle is not None
        order = np.random.default_rng(args.shuffle).permutation(len(index.train)) if shuffled else None
        shards = pack_split(root, getattr(index, split), out, split, args.shard_size, order)
        print(f"{out / split}: {len(getattr(index, split))} images in {len(shards)} shard(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
