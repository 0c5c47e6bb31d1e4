#!/usr/bin/env python
"""Arrange the official ImageNet-1k release as DIR/train/<wnid>/*.JPEG and DIR/val/<wnid>/*.JPEG, then
build and validate the dataset index.

  prepare_imagenet.py --train SRC_TRAIN --val SRC_VAL --labels LOC_val_solution.csv --out DIR [--move]

SRC_TRAIN holds one folder per class (wnid); SRC_VAL is the flat folder of 50,000 validation images; the
labels are Kaggle's LOC_val_solution.csv (`ImageId,PredictionString` with the wnid first) or a two-column
`file wnid` text file. Images are symlinked (or moved with --move).
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from resnest_train.data.index import DatasetError, load_index, warn_skipped  # noqa: E402


def read_val_labels(path: Path) -> dict[str, str]:
    """image stem -> wnid."""
    labels = {}
    with open(path, newline="") as handle:
        if path.suffix == ".csv":
            for row in csv.DictReader(handle):
                labels[row["ImageId"]] = row["PredictionString"].split()[0]
        else:
            for line in handle:
                if line.strip():
                    name, wnid = line.split()[:2]
                    labels[Path(name).stem] = wnid
    return labels


def place(src: Path, dst: Path, move: bool) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() or dst.is_symlink():
        return
    if move:
        shutil.move(src, dst)
    else:
        os.symlink(src.resolve(), dst)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=Path, required=True)
    parser.add_argument("--val", type=Path, required=True)
    parser.add_argument("--labels", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--move", action="store_true")
    args = parser.parse_args(argv)
    for path in (args.train, args.val, args.labels):
        if not path.exists():
            print(f"error: not found: {path}", file=sys.stderr)
            return 2
    for class_dir in sorted(p for p in args.train.iterdir() if p.is_dir()):
        for image in class_dir.iterdir():
            place(image, args.out / "train" / class_dir.name / image.name, args.move)
    labels = read_val_labels(args.labels)
    missing = 0
    for image in sorted(args.val.iterdir()):
        wnid = labels.get(image.stem)
        if wnid is None:
            missing += 1
            continue
        place(image, args.out / "val" / wnid / image.name, args.move)
    if missing:
        print(f"warning: {missing} validation images have no label in {args.labels}", file=sys.stderr)
    try:
        index = load_index(args.out)
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    warn_skipped(index)
    print(f"{args.out}: {len(index.classes)} classes, {len(index.train)} train and {len(index.val)} val images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
