"""The dataset index (data/index.py): class identity on shards (`.cls` indices are the lines of
`classes.txt`, mapped by name onto a model's classes), the index cache when damaged or stale, and the
`python -m resnest_train.data.index` command on bad data (one line, never a traceback)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from resnest_train.data.index import DatasetError, load_index
from resnest_train.data.index_table import cache_paths
from tests.conftest import ROOT, run_script, train_args


def pack_permuted(image_root: Path, out: Path, order: list[int]) -> list[str]:
    """image_root's val/ as one shard whose classes.txt lists the classes in `order` (line i names class
    order[i]) and whose `.cls` members follow it; returns the class names in the folder's order."""
    classes = sorted(p.name for p in (image_root / "val").iterdir())
    line_of = {classes[c]: i for i, c in enumerate(order)}
    (out / "val").mkdir(parents=True)
    (out / CLASSES).write_text("".join(f"{classes[c]}\n" for c in order))
    with tarfile.open(out / "val" / "v.tar", "w") as tar:
        for path in sorted((image_root / "val").rglob("*.jpg")):
            key = f"{path.parent.name}/{path.stem}"
            label = str(line_of[path.parent.name]).encode()
            for name, data in ((f"{key}.jpg", path.read_bytes()), (f"{key}.cls", label)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return classes


CLASSES = "classes.txt"


def test_shard_labels_are_mapped_onto_the_models_classes_by_name(image_root, tmp_path):
    classes = pack_permuted(image_root, tmp_path, [2, 0, 3, 1])
    folder = load_index(image_root).val
    index = load_index(tmp_path, classes=classes, splits=("val",), write_cache=False)
    assert index.classes == classes and index.val.labels.tolist() == folder.labels.tolist()
    own = load_index(tmp_path, splits=("val",), write_cache=False)  # without a model: classes.txt's order
    assert own.classes == [classes[c] for c in (2, 0, 3, 1)]
    assert [own.classes[label] for label in own.val.labels] == [classes[label] for label in folder.labels]
    with pytest.raises(DatasetError, match=f"class 'class_002' of {tmp_path / CLASSES} is not a class of the model"):
        load_index(tmp_path, classes=["class_000", "class_001", "x", "class_003"], splits=("val",), write_cache=False)


def test_a_classes_file_that_misses_a_class_index_is_one_error_naming_it(image_root, tmp_path):
    pack_permuted(image_root, tmp_path, [0, 1, 2, 3])
    (tmp_path / CLASSES).write_text("class_000\nclass_001\nclass_002\n")
    with pytest.raises(DatasetError, match=f"^{tmp_path / CLASSES} names 3 classes but .*v.tar:class_003/.* has "
                                           "class index 3: it must name every class index"):
        load_index(tmp_path, splits=("val",), write_cache=False)
    (tmp_path / CLASSES).unlink()
    with pytest.raises(DatasetError, match="has class index 3 but the model has 3 classes"):
        load_index(tmp_path, classes=["a", "b", "c"], splits=("val",), write_cache=False)


@pytest.mark.slow
def test_evaluation_on_shards_in_another_class_order_matches_the_folder(image_root, tmp_path):
    """A checkpoint trained on the folder, evaluated on the same images as shards whose classes.txt lists
    the classes in another order: the same top-1 (the labels are mapped by name); weights without class
    names take them from --classes."""
    run_script(train_args(image_root, tmp_path / "run", "data.backend=torchvision", "train.epochs=2"))
    ours = tmp_path / "run" / "checkpoints" / "last.pt"
    bare = tmp_path / "bare.pt"
    torch.save({"model": torch.load(ours, map_location="cpu", weights_only=True)["model"]}, bare)
    classes = pack_permuted(image_root, tmp_path / "shards", [3, 1, 0, 2])
    (tmp_path / "names.txt").write_text("".join(f"{name}\n" for name in classes))
    base = [str(ROOT / "evaluate.py"), "--config", str(tmp_path / "run" / "config.yaml"), "data.backend=torchvision"]
    runs = {"folder": [f"data.root={image_root}", "--checkpoint", str(ours)],
            "shards": [f"data.root={tmp_path / 'shards'}", "--checkpoint", str(ours)],
            "bare": [f"data.root={tmp_path / 'shards'}", "--checkpoint", str(bare), "--classes",
                     str(tmp_path / "names.txt")]}
    top1 = {}
    for name, args in runs.items():
        run_script([*base, *args, "--output", str(tmp_path / f"{name}.json")])
        top1[name] = json.loads((tmp_path / f"{name}.json").read_text())["results"][0]["top1"]
    assert top1["folder"] == top1["shards"] == top1["bare"], top1


def index_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "resnest_train.data.index", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


@pytest.mark.parametrize("damage", [lambda data: data[:len(data) // 2], lambda data: data[:40] + b"\xff" + data[41:],
                                    lambda data: b""], ids=["truncated", "bit-flip", "empty"])
def test_a_damaged_index_cache_is_rebuilt_with_one_warning_naming_it(image_root, tmp_path, damage):
    root = tmp_path / "data"
    shutil.copytree(image_root, root)
    first = index_cli(str(root))
    assert first.returncode == 0 and first.stderr == "", first.stderr
    cache = cache_paths(root)[0]
    cache.write_bytes(damage(cache.read_bytes()))
    again = index_cli(str(root))
    assert again.returncode == 0, again.stderr
    assert f"{cache} is damaged" in again.stdout + again.stderr and "Traceback" not in again.stderr
    assert index_cli(str(root), "--recheck").returncode == 0
    assert len(load_index(root).train) == 48 and index_cli(str(root)).stderr == ""


@pytest.mark.parametrize("shard,needle", [
    (b"<html>not found</html>" * 40, "not a tar archive"),
    (b"", "empty shard (0 bytes)"),
], ids=["not-a-tar", "empty"])
def test_the_index_command_names_a_bad_shard_without_a_traceback(image_root, tmp_path, shard, needle):
    shutil.copytree(image_root, tmp_path / "data")
    assert subprocess.run([sys.executable, str(ROOT / "scripts" / "pack_dataset.py"), "--root", str(tmp_path / "data"),
                           "--out", str(tmp_path / "shards")], capture_output=True).returncode == 0
    (tmp_path / "shards" / "train" / "zz.tar").write_bytes(shard)
    result = index_cli(str(tmp_path / "shards"))
    assert result.returncode == 0 and "Traceback" not in result.stderr and "RuntimeWarning" not in result.stderr
    assert f"{tmp_path / 'shards' / 'train' / 'zz.tar'}: {needle}" in result.stdout + result.stderr
    (tmp_path / "shards" / "train" / "zz.tar").write_bytes(b"x" * 600)  # a header with a bad checksum
    assert "Traceback" not in index_cli(str(tmp_path / "shards")).stderr


def test_the_fresher_of_the_two_caches_wins(image_root, tmp_path, monkeypatch):
    """Read-only data whose cache beside it is stale: the fresh copy in ~/.cache is used, not rescanned."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    root = tmp_path / "data"
    shutil.copytree(image_root, root)
    load_index(root)
    beside, home = cache_paths(root)
    stale, written = beside.read_bytes(), beside.stat().st_mtime_ns
    (root / "train" / "class_000" / "train_000_00000.jpg").unlink()
    home.parent.mkdir(parents=True)
    beside.rename(home)
    load_index(root)  # writes beside the data: move that fresh copy to ~/.cache, put the stale one back
    beside.rename(home)
    beside.write_bytes(stale)
    os.utime(beside, ns=(written, written))  # the stale copy is the older file, as it would be
    scanned = []
    from resnest_train.data import index_table
    real = index_table.scan_unit
    monkeypatch.setattr(index_table, "scan_unit", lambda task: scanned.append(task[0]) or real(task))
    assert len(load_index(root, write_cache=False).train) == 47 and scanned == []
