"""webdataset tar shards (index.py, filescan.py, scripts/pack_dataset.py): the same data as a folder and as
shards is the same training list, position for position, read with no per-image file open; a run on either
reads the same micro-batches with the same augmentation draws and ends with bit-identical weights, on
DALI and on torchvision; evaluation on val shards counts every image once; the public ImageNet-1k webdataset
layout (`.jpeg` + `.cls`, no class names) trains and
evaluates."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from resnest_train.data import filescan
from resnest_train.data.index import load_index
from resnest_train.data.sample_read import read_sample
from tests.conftest import ROOT, run_script, script_env, train_args

PACK = str(ROOT / "scripts" / "pack_dataset.py")


def pack(root: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, PACK, "--root", str(root), "--out", str(out), *extra],
                          capture_output=True, text=True, cwd=ROOT)


@pytest.fixture(scope="module")
def shards(image_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    result = pack(image_root, out, "--shard-size", "20000")
    assert result.returncode == 0, result.stderr
    return out


def test_packed_shards_hold_the_folders_list_position_for_position(image_root, shards, tmp_path):
    folder, packed = load_index(image_root), load_index(shards)
    assert packed.layout == "shards" and packed.classes == folder.classes
    assert len(list((shards / "train").glob("*.tar"))) > 1  # several shards, in order
    for split in ("train", "val"):
        a, b = getattr(folder, split), getattr(packed, split)
        assert b.labels.tolist() == a.labels.tolist()
        assert all(read_sample(image_root, a, i) == read_sample(shards, b, i) for i in range(len(a)))
    assert packed.train.path(0) == "train/train-000000.tar:class_000/train_000_00000.jpg"
    again = tmp_path / "again"
    assert pack(image_root, again, "--shard-size", "20000").returncode == 0  # deterministic
    for path in sorted(shards.rglob("*.tar")):
        assert (again / path.relative_to(shards)).read_bytes() == path.read_bytes()


def test_file_names_that_share_a_webdataset_key_stay_distinct_images(image_root, tmp_path):
    """webdataset's key ends at the first dot of a name, and the packer's own keys turn dots into
    underscores: `photo.v1.jpg` and `photo_v1.jpg`, `x.JPG` and `x.jpg`, `n.jpg` and `n.png` were one sample
    each to the index (the packer said 14 training images, the index found 11). Each keeps a key of its own,
    in the folder's order, clear of a real name (`x_2.jpg`)."""
    jpeg = (image_root / "train" / "class_000" / "train_000_00000.jpg").read_bytes()
    png = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(png, format="PNG")
    root = tmp_path / "folder"
    for split, names in (("train", ["photo.v1.jpg", "photo_v1.jpg", "x.JPG", "x.jpg", "x_2.jpg", "n.jpg", "n.png"]),
                         ("val", ["v.jpg", "v.jpeg"])):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for name in names:
                (root / split / cls / name).write_bytes(png.getvalue() if name.endswith("png") else jpeg)
    folder = load_index(root)
    assert (len(folder.train), len(folder.val)) == (14, 4)
    result = pack(root, tmp_path / "shards", "--shard-size", "3000")
    assert result.returncode == 0, result.stderr
    packed = load_index(tmp_path / "shards")
    reported = [int(line.split(": ")[1].split()[0]) for line in result.stdout.splitlines() if " images in " in line]
    assert reported == [len(packed.train), len(packed.val)] == [14, 4]
    for split in ("train", "val"):
        a, b = getattr(folder, split), getattr(packed, split)
        assert b.labels.tolist() == a.labels.tolist()
        assert all(read_sample(root, a, i) == read_sample(tmp_path / "shards", b, i) for i in range(len(a)))
    members = [packed.train.path(i).rpartition(":")[2] for i in range(7)]
    assert members == ["a/n.jpg", "a/n_2.png", "a/photo_v1.jpg", "a/photo_v1_2.jpg", "a/x.jpg", "a/x_3.jpg",
                       "a/x_2.jpg"]

def test_shards_open_warm_with_no_file_opened(shards, monkeypatch):
    load_index(shards)
    opened = []
    real_open = tarfile.open
    monkeypatch.setattr(tarfile, "open", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    index = load_index(shards)
    assert opened == [] and len(index.train) == 48


def test_a_bad_image_inside_a_shard_is_named_shard_and_member(image_root, tmp_path):
    out = tmp_path / "bad"
    assert pack(image_root, out).returncode == 0
    shard = out / "train" / "train-000000.tar"
    with tarfile.open(shard) as tar:
        member = tar.getmember("class_001/train_001_00003.jpg")
    data = bytearray(shard.read_bytes())
    data[member.offset_data + member.size - 2:member.offset_data + member.size] = b"\0\0"  # no end marker
    shard.write_bytes(bytes(data))
    index = load_index(out)
    assert index.skipped == [(f"{shard}:class_001/train_001_00003.jpg", "truncated JPEG (no end-of-image marker)")]
    assert len(index.train) == 47


def sample_rows(folder: Path) -> list:
    """Each micro-batch's samples and their augmentation draws, as recorded."""
    rows = [json.loads(line) for path in folder.glob("rank*.jsonl") for line in path.read_text().splitlines()]
    return sorted((row["samples"], row.get("draws")) for row in rows)


def train_on(root: Path, out: Path, backend: str) -> tuple[dict, list]:
    record = out / "samples"
    record.mkdir(parents=True)
    run_script(train_args(root, out, f"data.backend={backend}", "train.epochs=2", "train.deterministic=true"),
               env=script_env(RESNEST_TRAIN_SAMPLE_LOG=str(record)))
    state = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["model"]
    return state, sample_rows(record)


def evaluate_on(root: Path, checkpoint: Path, out: Path, backend: str = "torchvision") -> dict:
    run_script([str(ROOT / "evaluate.py"), "--config", str(ROOT / "configs" / "demo.yaml"), "--checkpoint",
                str(checkpoint), "--output", str(out), f"data.root={root}", "model.num_classes=4",
                f"data.backend={backend}", "data.workers=1", "--crop-size", "32"])
    return json.loads(out.read_text())["results"][0]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torchvision", "dali"])
def test_folder_and_shards_train_the_same_weights_and_evaluate_the_same(image_root, shards, tmp_path, backend):
    folder_weights, folder_rows = train_on(image_root, tmp_path / "folder", backend)
    shard_weights, shard_rows = train_on(shards, tmp_path / "shards", backend)
    assert folder_rows == shard_rows and len(folder_rows) == 2 * 48 // 8  # the same micro-batches and draws
    assert all(draws is not None for _, draws in folder_rows)
    assert [k for k in folder_weights if not torch.equal(folder_weights[k], shard_weights[k])] == []
    checkpoint = tmp_path / "folder" / "checkpoints" / "last.pt"
    on_folder = evaluate_on(image_root, checkpoint, tmp_path / "f.json", backend)
    on_shards = evaluate_on(shards, checkpoint, tmp_path / "s.json", backend)
    assert on_shards["num_images"] == on_folder["num_images"] == 20 and on_shards["top1"] == on_folder["top1"]


def write_public_layout(image_root: Path, out: Path) -> None:
    """The public ImageNet-1k webdataset copy's layout: flat keys, `.jpeg` images, `.cls` indices, no class
    names file."""
    index = load_index(image_root)
    for split in ("train", "val"):
        samples = getattr(index, split)
        (out / split).mkdir(parents=True)
        with tarfile.open(out / split / f"imagenet1k-{split}-0000.tar", "w") as tar:
            for i in range(len(samples)):
                for name, data in ((f"n{i:05d}_{split}.jpeg", read_sample(image_root, samples, i)),
                                   (f"n{i:05d}_{split}.cls", str(int(samples.labels[i])).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


@pytest.mark.slow
def test_public_webdataset_layout_trains_and_evaluates(image_root, tmp_path):
    root = tmp_path / "wds"
    write_public_layout(image_root, root)
    index = load_index(root)
    assert index.classes == ["0", "1", "2", "3"] and len(index.train) == 48 and len(index.val) == 20
    out = tmp_path / "run"
    result = run_script(train_args(root, out, "train.epochs=1"))  # the demo config's DALI pipeline
    assert "Traceback" not in result.stderr and f"in {root} (webdataset shards)" in result.stdout
    report = evaluate_on(root, out / "checkpoints" / "last.pt", tmp_path / "e.json", "dali")
    assert report["num_images"] == 20


@pytest.mark.parametrize("tar_format", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_members_are_listed_as_tarfile_lists_them(tmp_path, tar_format):
    """The scan's own header parser (plain headers) and tarfile (anything else) agree, long names and
    folders included."""
    path = tmp_path / "t.tar"
    names = ["a.jpg", "b/c.cls", "d" * 90 + "/" + "e" * 60 + ".jpg"]  # > 100 characters: a prefix or a long name
    with tarfile.open(path, "w", format=tar_format) as tar:
        folder = tarfile.TarInfo("folder")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for i, name in enumerate(names):
            info = tarfile.TarInfo(name)
            info.size = 700 * i + 3
            tar.addfile(info, io.BytesIO(bytes(info.size)))
    size = path.stat().st_size
    with open(path, "rb") as raw:
        ours, problem = filescan._tar_members(filescan.FileReader(raw, size))
        assert (ours, problem) == filescan._tarfile_members(filescan.FileReader(raw, size)) and problem is None
        assert [name for name, _, _ in ours] == names


def test_shuffled_packing_is_seeded_mixes_classes_and_keeps_every_image(image_root, shards, tmp_path):
    """--shuffle SEED: the training images in a random order from SEED (the same SEED, the same bytes), so a
    shard holds several classes where the class-sorted packing holds one or two; the same images and labels,
    as many as the packer says; validation packed as without it."""
    one, again, other = (tmp_path / name for name in ("one", "again", "other"))
    results = [pack(image_root, out, "--shard-size", "20000", "--shuffle", seed)
               for out, seed in ((one, "3"), (again, "3"), (other, "4"))]
    assert [result.returncode for result in results] == [0, 0, 0], results[0].stderr
    tars = sorted(path.relative_to(one) for path in one.rglob("*.tar"))
    assert tars == sorted(path.relative_to(again) for path in again.rglob("*.tar"))
    assert all((one / path).read_bytes() == (again / path).read_bytes() for path in tars)
    folder, packed, sorted_packing = load_index(image_root), load_index(one), load_index(shards)
    assert packed.train.labels.tolist() != folder.train.labels.tolist()  # another order ...
    assert packed.train.labels.tolist() != load_index(other).train.labels.tolist()  # ... from the seed
    reported = [int(line.split(": ")[1].split()[0]) for line in results[0].stdout.splitlines() if " images in " in line]
    assert reported == [len(packed.train), len(packed.val)] == [48, 20]
    key = (lambda samples, i: (samples.path(i).rpartition(":")[2], int(samples.labels[i])))
    assert sorted(key(packed.train, i) for i in range(48)) == sorted(key(sorted_packing.train, i) for i in range(48))
    assert all(read_sample(one, packed.train, i) == read_sample(image_root, folder.train, folder.train.position(
        "train/" + packed.train.path(i).rpartition(":")[2])) for i in range(48))

    def classes_per_shard(samples) -> list[int]:
        return [len(set(samples.labels[samples.dir_ids == d].tolist())) for d in range(len(samples.dirs))]
    assert len(packed.train.dirs) > 2 and min(classes_per_shard(packed.train)) >= 3
    assert max(classes_per_shard(sorted_packing.train)) <= 2  # class by class: a shard spans at most two
    assert all((one / "val" / path.name).read_bytes() == path.read_bytes() for path in (shards / "val").glob("*.tar"))


def test_a_negative_shuffle_seed_is_one_error_line(image_root, tmp_path):
    result = pack(image_root, tmp_path / "out", "--shuffle", "-1")
    assert result.returncode == 2 and result.stderr == "error: --shuffle must be non-negative, got -1\n"
