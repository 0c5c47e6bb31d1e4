"""scripts/prepare_imagenet.py on a tiny fake release: a rerun gives exactly the new input's layout (links and
--move), and every bad input is one `error:` line with exit code 2, before anything is written."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import ROOT, run_script

SCRIPT = str(ROOT / "scripts" / "prepare_imagenet.py")
CLASSES = ["n01440764", "n01443537", "n01484850"]
# Six val images, two per class, ids as in the release.
TRUE_LABELS = {f"ILSVRC2012_val_{i:08d}": CLASSES[(i - 1) % 3] for i in range(1, 7)}


def make_release(root: Path) -> tuple[Path, Path]:
    """root/train/<wnid>/<wnid>_<k>.JPEG (2 per class) and the flat root/val of TRUE_LABELS' images."""
    train, val = root / "train", root / "val"
    for label, wnid in enumerate(CLASSES):
        (train / wnid).mkdir(parents=True)
        for k in range(2):
            Image.new("RGB", (16, 16), (80 * label, 100 * k, 50)).save(train / wnid / f"{wnid}_{k}.JPEG")
    val.mkdir()
    for index, image_id in enumerate(TRUE_LABELS):
        Image.new("RGB", (16, 16), (40 * index, 0, 90)).save(val / f"{image_id}.JPEG")
    return train, val


def write_csv(path: Path, labels: dict[str, str]) -> Path:
    rows = ["ImageId,PredictionString", *(f"{i},{wnid} 1 2 3 4" for i, wnid in labels.items())]
    path.write_text("\n".join(rows) + "\n")
    return path


def write_text(path: Path, labels: dict[str, str]) -> Path:
    path.write_text("".join(f"{image_id}.JPEG {wnid}\n" for image_id, wnid in labels.items()))
    return path


def prepare(release: Path, labels: Path, out: Path, *extra: str, expect: int = 0):
    return run_script([SCRIPT, "--train", str(release / "train"), "--val", str(release / "val"), "--labels",
                       str(labels), "--out", str(out), *extra], expect=expect, timeout=120)


def listing(out: Path) -> dict[str, str]:
    """Every entry of out/train and out/val -> the release path it links to, or 'file'."""
    entries = {}
    for tree in ("train", "val"):
        for folder, _, names in os.walk(out / tree):
            for name in names:
                path = Path(folder) / name
                entries[str(path.relative_to(out))] = os.readlink(path) if path.is_symlink() else "file"
    return entries


def expected_links(release: Path, labels: dict[str, str]) -> dict[str, str]:
    train = {f"train/{p.parent.name}/{p.name}": str(p.resolve()) for p in (release / "train").glob("*/*")}
    val = {f"val/{wnid}/{i}.JPEG": str((release / "val" / f"{i}.JPEG").resolve()) for i, wnid in labels.items()}
    return {**train, **val}


def test_rerun_after_a_labels_fix_gives_exactly_the_new_layout(tmp_path):
    release, out = tmp_path / "release", tmp_path / "imagenet"
    make_release(release)
    wrong = dict(TRUE_LABELS, ILSVRC2012_val_00000001=CLASSES[1])
    prepare(release, write_csv(tmp_path / "LOC_val_solution.csv", wrong), out)
    assert listing(out) == expected_links(release, wrong)
    (out / "notes.txt").write_text("outside train/ and val/: never touched")
    (release / "train" / CLASSES[2] / f"{CLASSES[2]}_1.JPEG").unlink()  # gone from the release too
    result = prepare(release, write_text(tmp_path / "val.txt", TRUE_LABELS), out)
    assert listing(out) == expected_links(release, TRUE_LABELS)
    assert "3 classes, 5 train and 6 val images" in result.stdout
    assert (out / "notes.txt").exists() and (out / ".resnest_index.npz").exists()


def test_move_rerun_refiles_moved_images_and_never_loses_one(tmp_path):
    release, out = tmp_path / "release", tmp_path / "imagenet"
    make_release(release)
    wrong = dict(TRUE_LABELS, ILSVRC2012_val_00000001=CLASSES[1])
    prepare(release, write_csv(tmp_path / "wrong.csv", wrong), out, "--move")
    # The sources are gone; the rerun takes the moved images as its input and refiles the misfiled one.
    result = prepare(release, write_csv(tmp_path / "fixed.csv", TRUE_LABELS), out, "--move")
    assert "3 classes, 6 train and 6 val images" in result.stdout
    assert listing(out) == {key: "file" for key in expected_links(release, TRUE_LABELS)} | {
        f"train/{wnid}/{wnid}_{k}.JPEG": "file" for wnid in CLASSES for k in range(2)}
    assert list((release / "val").iterdir()) == []
    before = listing(out)
    dropped = dict(TRUE_LABELS)
    del dropped["ILSVRC2012_val_00000006"]
    result = prepare(release, write_csv(tmp_path / "dropped.csv", dropped), out, "--move", expect=2)
    assert result.stderr.startswith(f"error: 1 real file(s) in {out} that the input does not name: ")
    assert "ILSVRC2012_val_00000006.JPEG" in result.stderr
    assert len(result.stderr.splitlines()) == 1 and listing(out) == before


def _bad_labels(tmp_path: Path, case: str) -> Path:
    labels = dict(TRUE_LABELS)
    csv = tmp_path / "LOC_val_solution.csv"
    if case == "bad header":
        write_csv(csv, labels)
        csv.write_text(csv.read_text().replace("ImageId,PredictionString", "ImageId,Label"))
    elif case == "empty label":
        write_csv(csv, labels)
        csv.write_text(csv.read_text().replace("ILSVRC2012_val_00000002,n01443537 1 2 3 4", "ILSVRC2012_val_00000002,"))
    elif case == "one-column csv line":
        write_csv(csv, labels)
        csv.write_text(csv.read_text().replace("ILSVRC2012_val_00000004,n01440764 1 2 3 4", "ILSVRC2012_val_00000004"))
    elif case == "one-column text line":
        text = write_text(tmp_path / "val.txt", labels)
        text.write_text(text.read_text().replace("ILSVRC2012_val_00000003.JPEG n01484850", "ILSVRC2012_val_3"))
        return text
    elif case == "not text":
        write_csv(csv, labels)
        csv.write_bytes(csv.read_bytes().replace(b"ILSVRC2012_val_00000005,", b"\xff\xfe,"))
    elif case == "duplicates":
        text = tmp_path / "val.txt"
        write_text(text, labels)
        text.write_text(text.read_text() + "ILSVRC2012_val_00000001 n01443537\nILSVRC2012_val_00000002.JPEG n01484850\n"
                        "ILSVRC2012_val_00000003 n01484850\n")  # the last one repeats its label: fine
        return text
    elif case == "missing images":
        write_csv(csv, dict(labels, ILSVRC2012_val_00000007=CLASSES[0], ILSVRC2012_val_00000008=CLASSES[0]))
    elif case == "unknown class":
        write_csv(csv, dict(labels, ILSVRC2012_val_00000001="n99999999"))
    return csv


BAD_INPUTS = [
    ("bad header", "LOC_val_solution.csv, line 1: expected the header 'ImageId,PredictionString', got "
                   "'ImageId,Label'"),
    ("empty label", "LOC_val_solution.csv, line 3: empty label (PredictionString)"),
    ("one-column csv line", "LOC_val_solution.csv, line 5: expected 2 columns (ImageId,PredictionString), got 1"),
    ("one-column text line", "val.txt, line 3: expected 'FILE WNID', got 'ILSVRC2012_val_3'"),
    ("not text", "LOC_val_solution.csv, line 6: not UTF-8 text"),
    ("duplicates", "val.txt: 2 image id(s) with two different labels: ILSVRC2012_val_00000001 (n01440764 on "
                   "line 1, n01443537 on line 7), ILSVRC2012_val_00000002 (n01443537 on line 2, n01484850 on line 8)"),
    ("missing images", "2 image id(s) in {labels} with no image in {val}: ILSVRC2012_val_00000007, "
                       "ILSVRC2012_val_00000008"),
    ("unknown class", "1 val image(s) labelled with a class that has no images in {train}: "
                      "ILSVRC2012_val_00000001 (n99999999)"),
]


@pytest.mark.parametrize("case,message", BAD_INPUTS, ids=[case for case, _ in BAD_INPUTS])
def test_bad_input_is_one_error_line_and_nothing_written(tmp_path, case, message):
    release, out = tmp_path / "release", tmp_path / "imagenet"
    make_release(release)
    labels = _bad_labels(tmp_path, case)
    result = prepare(release, labels, out, expect=2)
    assert result.stderr.splitlines() == [result.stderr.splitlines()[0]] and result.stderr.startswith("error: ")
    assert message.format(labels=labels, val=release / "val", train=release / "train") in result.stderr
    assert not out.exists()


def test_an_id_repeated_with_its_label_is_fine(tmp_path):
    release = tmp_path / "release"
    make_release(release)
    labels = write_text(tmp_path / "val.txt", TRUE_LABELS)
    labels.write_text(labels.read_text() * 2)
    result = prepare(release, labels, tmp_path / "imagenet")
    assert "note: 6 lines of" in result.stdout and "3 classes, 6 train and 6 val images" in result.stdout
    assert result.stderr == ""
