#!/usr/bin/env python
"""Arrange the official ImageNet-1k release as DIR/train/<wnid>/*.JPEG and DIR/val/<wnid>/*.JPEG, then
build and validate the dataset index.

  prepare_imagenet.py --train SRC_TRAIN --val SRC_VAL --labels LOC_val_solution.csv --out DIR [--move]

SRC_TRAIN holds one folder per class (wnid); SRC_VAL is the flat folder of 50,000 validation images; the
labels are Kaggle's LOC_val_solution.csv (`ImageId,PredictionString` with the wnid first) or a two-column
`file wnid` text file. Images are symlinked (or moved with --move).

The whole input is checked before anything is written: a malformed labels line (named by file and line),
an image id given two different labels, an id with no image and a label with no train class each stop the
script with one `error:` line and exit code 2. An id repeated with the same label is harmless (one note).

A rerun makes DIR/train and DIR/val match the new input exactly: links the input no longer names (a val
image filed under a wrong class before a labels fix, a train image since removed) are deleted, and empty
class folders with them; nothing outside those two trees is touched. Images an earlier --move put into DIR
are part of the input of a rerun (their sources are gone): they are moved within DIR to where the new
labels put them. A real file in DIR that the new input does not name (a moved image whose id left the
labels) is never deleted: the rerun stops, before changing anything, with an error naming it.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from resnest_train.errors import UserError  # noqa: E402

CSV_HEADER = ["ImageId", "PredictionString"]
EXAMPLES = 3  # named in an error line; the count says how many more


class PrepareError(UserError):
    """The release or the labels are not what the layout needs; nothing has been written yet."""


def _examples(items: list[str]) -> str:
    return ", ".join(items[:EXAMPLES]) + (", ..." if len(items) > EXAMPLES else "")


def _text_lines(path: Path) -> list[str]:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise PrepareError(f"{path}, line {line}: not UTF-8 text") from None


def _csv_rows(path: Path, lines: list[str]) -> Iterator[tuple[int, str, str]]:
    """(line number, image id, wnid) of Kaggle's LOC_val_solution.csv."""
    reader = csv.reader(lines)
    header = next(reader, [])
    if [column.strip() for column in header] != CSV_HEADER:
        got = repr(lines[0]) if lines else "an empty file"
        raise PrepareError(f"{path}, line 1: expected the header '{','.join(CSV_HEADER)}', got {got}")
    for row in reader:
        if not "".join(row).strip():
            continue
        if len(row) != 2:
            raise PrepareError(f"{path}, line {reader.line_num}: expected 2 columns (ImageId,PredictionString), "
                               f"got {len(row)}")
        image_id, prediction = row[0].strip(), row[1].split()
        if not image_id or not prediction:
            empty = "ImageId" if not image_id else "label (PredictionString)"
            raise PrepareError(f"{path}, line {reader.line_num}: empty {empty}")
        yield reader.line_num, image_id, prediction[0]


def _text_rows(path: Path, lines: list[str]) -> Iterator[tuple[int, str, str]]:
    """(line number, image id, wnid) of a `file wnid` text file."""
    for number, line in enumerate(lines, 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 2:
            raise PrepareError(f"{path}, line {number}: expected 'FILE WNID', got {line.strip()!r}")
        yield number, Path(fields[0]).stem, fields[1]


def read_val_labels(path: Path) -> tuple[dict[str, str], int]:
    """image stem -> wnid, and how many lines repeated an id with the label it already had."""
    lines = _text_lines(path)
    rows = _csv_rows(path, lines) if path.suffix.lower() == ".csv" else _text_rows(path, lines)
    labels: dict[str, str] = {}
    first_line: dict[str, int] = {}
    conflicts: dict[str, str] = {}
    repeats = 0
    for number, image_id, wnid in rows:
        if image_id not in labels:
            labels[image_id], first_line[image_id] = wnid, number
        elif labels[image_id] == wnid:
            repeats += 1
        elif image_id not in conflicts:
            conflicts[image_id] = (f"{image_id} ({labels[image_id]} on line {first_line[image_id]}, "
                                   f"{wnid} on line {number})")
    if conflicts:
        raise PrepareError(f"{path}: {len(conflicts)} image id(s) with two different labels: "
                           f"{_examples(list(conflicts.values()))}")
    if not labels:
        raise PrepareError(f"{path}: no labels in it")
    return labels, repeats


def _moved_files(tree: Path) -> list[Path]:
    """Real files (not links) at tree/<class>/<file>: images an earlier --move put there."""
    if not tree.is_dir():
        return []
    # scandir's entry types come with the listing: no stat per image on a rerun over 1.28M links.
    return sorted(tree / folder.name / image.name for folder in os.scandir(tree) if folder.is_dir(follow_symlinks=False)
                  for image in os.scandir(folder.path) if image.is_file(follow_symlinks=False))


def find_images(train: Path, val: Path, out: Path) -> tuple[dict[tuple[str, str], Path], dict[str, Path]]:
    """(wnid, file name) -> train image and image id -> val image, the release's and those moved into `out`
    (which win: they already sit in the layout and their sources are gone)."""
    train_images = {(folder.name, image.name): image for folder in sorted(train.iterdir()) if folder.is_dir()
                    for image in sorted(folder.iterdir()) if image.is_file()}
    train_images.update({(image.parent.name, image.name): image for image in _moved_files(out / "train")})
    val_images = {}
    for image in sorted(val.iterdir()):
        if image.is_file():
            val_images.setdefault(image.stem, image)
    moved: dict[str, Path] = {}
    for image in _moved_files(out / "val"):
        if image.stem in moved:
            raise PrepareError(f"image id {image.stem} is in {out / 'val'} twice: {moved[image.stem]} and {image}")
        moved[image.stem] = image
    return train_images, {**val_images, **moved}


def plan_layout(train_images: dict, val_images: dict, labels: dict[str, str], args) -> tuple[dict, list[str]]:
    """destination -> source of every image, and the val ids that have no label; errors for labels that
    name no image or no train class."""
    missing = sorted(set(labels) - set(val_images))
    if missing:
        where = f"{args.val} (nor in {args.out / 'val'})" if (args.out / "val").is_dir() else str(args.val)
        raise PrepareError(f"{len(missing)} image id(s) in {args.labels} with no image in {where}: "
                           f"{_examples(missing)}")
    classes = {wnid for wnid, _ in train_images}
    unknown = sorted(image_id for image_id, wnid in labels.items() if wnid not in classes)
    if unknown:
        raise PrepareError(f"{len(unknown)} val image(s) labelled with a class that has no images in "
                           f"{args.train}: {_examples([f'{i} ({labels[i]})' for i in unknown])}")
    layout = {args.out / "train" / wnid / name: image for (wnid, name), image in train_images.items()}
    unlabelled = []
    for image_id, image in val_images.items():
        if image_id in labels:
            layout[args.out / "val" / labels[image_id] / image.name] = image
        else:
            unlabelled.append(image_id)
    return layout, unlabelled


def _tree_entries(tree: Path) -> Iterator[tuple[Path, bool]]:
    """(path, is a link) of every entry below `tree` that is not a real folder, without following links."""
    if not tree.is_dir() or tree.is_symlink():
        return
    for entry in os.scandir(tree):
        path = tree / entry.name
        if entry.is_dir(follow_symlinks=False):
            yield from _tree_entries(path)
        else:
            yield path, entry.is_symlink()


def stale_links(out: Path, layout: dict[Path, Path]) -> list[Path]:
    """The links in out/train and out/val that the layout does not name. A real file it does not name (not
    even as a source, to be moved) would be lost: an error, before anything is changed."""
    sources = set(layout.values())
    links, lost = [], []
    for tree in (out / "train", out / "val"):
        for path, is_link in _tree_entries(tree):
            if path not in layout and is_link:
                links.append(path)
            elif path not in layout and path not in sources:
                lost.append(str(path))
    if lost:
        raise PrepareError(f"{len(lost)} real file(s) in {out} that the input does not name: "
                           f"{_examples(sorted(lost))}; they may be the only copies (moved there by --move), so "
                           "nothing was changed: move them out of the way and rerun")
    return links


def place(src: Path, dst: Path, move: bool) -> None:
    if src == dst:
        return  # moved here by an earlier --move and still in its place
    target = None if move else str(src.resolve())
    if dst.is_symlink():
        if target is not None and os.readlink(dst) == target:
            return
        dst.unlink()
    elif dst.exists():  # a real image in the layout is its own source (find_images): this is something else
        raise PrepareError(f"{dst} is in the way (neither a link nor an image of the input)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    if move:
        shutil.move(src, dst)
    else:
        os.symlink(target, dst)


def _remove_empty_folders(tree: Path) -> None:
    for folder, _, _ in sorted(os.walk(tree), key=lambda item: -len(item[0])):
        if Path(folder) != tree and not os.listdir(folder):
            os.rmdir(folder)


def arrange(args) -> list[str]:
    """Check the input, then make out/train and out/val match it; returns the unlabelled val ids."""
    for path in (args.train, args.val, args.labels):
        if not path.exists():
            raise PrepareError(f"not found: {path}")
    for path in (args.train, args.val):
        if not path.is_dir():
            raise PrepareError(f"not a folder: {path}")
    labels, repeats = read_val_labels(args.labels)
    train_images, val_images = find_images(args.train, args.val, args.out)
    layout, unlabelled = plan_layout(train_images, val_images, labels, args)
    links = stale_links(args.out, layout)
    if repeats:
        print(f"note: {repeats} lines of {args.labels} repeat an image id with the label it already has")
    for link in links:
        link.unlink()
    for dst, src in sorted(layout.items()):
        # Images already in the output (moved there earlier) are moved within it, --move or not: a link
        # would point into the tree it belongs to.
        place(src, dst, args.move or src.is_relative_to(args.out))
    for tree in (args.out / "train", args.out / "val"):
        if tree.is_dir():
            _remove_empty_folders(tree)
    return unlabelled


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=Path, required=True)
    parser.add_argument("--val", type=Path, required=True)
    parser.add_argument("--labels", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--move", action="store_true")
    args = parser.parse_args(argv)
    try:
        unlabelled = arrange(args)
        if unlabelled:
            print(f"warning: {len(unlabelled)} validation images have no label in {args.labels}: "
                  f"{_examples(sorted(unlabelled))}", file=sys.stderr)
        # Imported only now: the data package imports torch (seconds), and a bad input is reported at once.
        from resnest_train.data.index import load_index, warn_skipped

        index = load_index(args.out)
    except (UserError, OSError) as exc:  # DatasetError included; a failed link or move names its path
        print(f"error: {exc}", file=sys.stderr)
        return 2
    warn_skipped(index)
    print(f"{args.out}: {len(index.classes)} classes, {len(index.train)} train and {len(index.val)} val images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
