"""The dataset index and the real DALI (CPU, device_id=None) and torchvision pipelines on generated JPEGs."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from resnest_train.data import index_table, resize_size
from resnest_train.data.index import DatasetError, load_index, scan
from resnest_train.data.torchvision import build_torch_train, build_torch_val, val_transform
from resnest_train.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from tests.conftest import ROOT, make_order, make_plan

try:
    from resnest_train.data.dali import build_dali_val
    from resnest_train.data.dali_train import build_dali_train
except ImportError:  # no DALI here: the tests that use it are marked `dali` and skip
    build_dali_train = build_dali_val = None


def test_index_classes_and_labels(image_root):
    index = load_index(image_root)
    assert index.classes == [f"class_{i:03d}" for i in range(4)]
    assert len(index.train) == 48 and len(index.val) == 20 and index.skipped == []
    assert all(path.split("/")[1] == index.classes[label] for path, label in index.train + index.val)


@pytest.fixture()
def dirty_root(image_root, tmp_path):
    root = tmp_path / "dirty"
    shutil.copytree(image_root, root)
    good = sorted((root / "train" / "class_000").glob("*.jpg"))[0].read_bytes()
    (root / "train" / "class_000" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "train" / "class_001" / "random.jpg").write_bytes(np.random.default_rng(0).bytes(3000))
    (root / "train" / "class_002" / "notes.txt").write_text("not an image")
    return root


def test_index_skips_and_names_bad_files(dirty_root):
    index = scan(dirty_root)
    names = sorted(p.split("/")[-1] for p, _ in index.skipped)
    assert names == ["random.jpg", "truncated.jpg"]
    assert len(index.train) == 48


@pytest.mark.parametrize("breakage,message", [
    (lambda root: shutil.rmtree(root / "val"), "dataset folder not found"),
    (lambda root: (root / "train" / "class_004").mkdir(), "class_004 has no usable images"),
    (lambda root: (root / "val" / "extra").mkdir(), "val classes missing from train"),
])
def test_index_errors(image_root, tmp_path, breakage, message):
    root = tmp_path / "broken"
    shutil.copytree(image_root, root)
    breakage(root)
    with pytest.raises(DatasetError, match=message):
        scan(root)


def test_index_cache_follows_changes(image_root, tmp_path):
    root = tmp_path / "cached"
    shutil.copytree(image_root, root)
    assert len(load_index(root).train) == 48
    (root / "train" / "class_000" / "train_000_00000.jpg").unlink()
    assert len(load_index(root).train) == 47


def class_from_pixels(images: torch.Tensor) -> torch.Tensor:
    """The generated classes differ by hue: the mean colour identifies them well enough to check labels."""
    return images.mean(dim=(2, 3))


@pytest.mark.dali
def test_dali_train_batches(image_root):
    index = load_index(image_root)
    loader = build_dali_train(make_plan(image_root, autoaugment="none"), index.train, make_order(48, 8))
    assert len(loader) == 6
    loader.set_epoch(0)
    batches = list(loader)
    assert len(batches) == 6
    images, targets = batches[0]
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32 and targets.dtype == torch.int64
    assert -3 < images.mean() < 3 and images.std() > 0.3  # normalised, not raw 0-255
    labels = torch.cat([t for _, t in batches])
    assert sorted(labels.tolist()) == sorted(label for _, label in index.train)  # one epoch = every image


@pytest.mark.dali
def test_dali_channels_last_layout(image_root):
    loader = build_dali_train(make_plan(image_root, channels_last=True), load_index(image_root).train,
                              make_order(48, 8))
    loader.set_epoch(0)
    images = next(iter(loader))[0]
    assert images.shape == (8, 3, 32, 32) and images.is_contiguous(memory_format=torch.channels_last)


def epoch_labels(loader, epoch: int = 0):
    loader.set_epoch(epoch)
    return [t.tolist() for _, t in loader]


def epoch_samples(loader, epoch: int) -> list[int]:
    loader.set_epoch(epoch)
    samples = []
    for _ in loader:
        samples.extend(loader.last_samples.tolist())
    return samples


@pytest.mark.dali
def test_dali_ranks_read_equal_disjoint_parts_with_different_augmentation(image_root):
    index = load_index(image_root)
    # 48 images, 5 ranks, micro-batches of 4: 2 steps of 20 images, 2 micro-batches per rank, every epoch.
    loaders = [build_dali_train(make_plan(image_root, rank=rank, world_size=5), index.train,
                                make_order(48, 4, world_size=5, rank=rank)) for rank in range(5)]
    for epoch in range(2):
        parts = [epoch_samples(loader, epoch) for loader in loaders]
        assert [len(part) for part in parts] == [8] * 5 and len(set(sum(parts, []))) == 40
    first = [build_dali_train(make_plan(image_root, rank=r, world_size=2), index.train,
                              make_order(48, 4, world_size=2, rank=r)) for r in range(2)]
    for loader in first:
        loader.set_epoch(0)
    a, b = (next(iter(loader))[0] for loader in first)
    assert not torch.equal(a, b)  # ranks never repeat each other's augmentation


@pytest.mark.dali
def test_dali_reproducible_and_reshuffled(image_root):
    index = load_index(image_root)
    make = lambda seed=3: build_dali_train(make_plan(image_root, seed=seed), index.train,  # noqa: E731
                                           make_order(48, 8, seed=seed))

    def images(loader, epoch):
        loader.set_epoch(epoch)
        return torch.cat([x for x, _ in loader])
    one, two = make(), make()
    e1, e2 = images(one, 0), images(one, 1)
    assert torch.equal(e1, images(two, 0))  # same seed, same first epoch
    assert not torch.equal(e1, e2)  # the next epoch differs
    assert epoch_labels(make(3)) != epoch_labels(make(4))  # train.seed changes the data order too


@pytest.mark.dali
def test_dali_val_shards_cover_each_image_once(image_root):
    index = load_index(image_root)
    seen = []
    for rank in range(3):
        plan = make_plan(image_root, rank=rank, world_size=3)
        loader = build_dali_val(plan, plan.shard(index.val), batch_size=4)
        seen.extend(t.tolist() for _, t in loader)
    flat = [label for batch in seen for label in batch]
    assert sorted(flat) == sorted(label for _, label in index.val)


def pil_reference(path, crop: int, resize: int) -> torch.Tensor:
    image = Image.open(path).convert("RGB")
    w, h = image.size
    scale = resize / min(w, h)
    image = image.resize((max(resize, round(w * scale)), max(resize, round(h * scale))), Image.BILINEAR)
    left, top = (image.width - crop) // 2, (image.height - crop) // 2
    array = np.asarray(image.crop((left, top, left + crop, top + crop)), dtype=np.float32) / 255
    return ((torch.from_numpy(array) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)).permute(2, 0, 1)


@pytest.fixture(scope="module")
def smooth_root(tmp_path_factory):
    """Smooth gradients of several aspect ratios: resampling kernels agree on them, unlike on noise."""
    root = tmp_path_factory.mktemp("smooth")
    for split in ("train", "val"):
        folder = root / split / "a"
        folder.mkdir(parents=True)
        for i, (w, h) in enumerate([(60, 48), (48, 70), (50, 50), (97, 41)]):
            y, x = np.mgrid[0:h, 0:w]
            rgb = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h) + 64 * (i % 2)], -1)
            Image.fromarray(rgb.astype(np.uint8)).save(folder / f"{i}.jpg", quality=95)
    return root


@pytest.mark.dali
@pytest.mark.parametrize("ops", ["auto", "dali"], ids=["cpu-graph", "gpu-graph"])
def test_dali_val_matches_pil_reference(smooth_root, ops):
    index = load_index(smooth_root)
    resize = resize_size(32, 0.875)
    loader = build_dali_val(make_plan(smooth_root), index.val, batch_size=4, ops=ops)
    images, _ = next(iter(loader))
    for i, (path, _) in enumerate(index.val):
        reference = pil_reference(smooth_root / path, 32, resize)
        # Decoders (libjpeg-turbo vs nvImageCodec) and resampling kernels differ by 1-3 grey levels
        # (0.04 here is ~2.3 levels); a wrong resize or crop is off by far more.
        assert (images[i] - reference).abs().mean() < 0.04, path
        assert (images[i] - pil_reference(smooth_root / path, 32, 32)).abs().mean() > 0.07
        torch_image = val_transform(32, resize, "bilinear")(Image.open(smooth_root / path).convert("RGB"))
        assert (images[i] - torch_image).abs().mean() < 0.04, path


def test_torchvision_pipeline_batches_and_resume_position(image_root):
    index = load_index(image_root)
    order = make_order(48, 8, world_size=2)
    loader = build_torch_train(make_plan(image_root, world_size=2), index.train, order)
    assert len(loader) == 3
    full = epoch_labels(loader)
    resumed = build_torch_train(make_plan(image_root, world_size=2), index.train, order, start=(0, 1))
    assert len(resumed) == 3 and epoch_labels(resumed) == full[1:]
    assert epoch_labels(resumed, 1) != full and len(epoch_labels(resumed, 1)) == 3  # the next epoch: all of it
    plan = make_plan(image_root, rank=1, world_size=3)
    val = build_torch_val(plan, plan.shard(index.val), batch_size=8)
    assert sum(len(t) for _, t in val) == math.ceil((20 - 1) / 3)


def test_links_and_folders_named_like_images_are_skipped_and_named(image_root, tmp_path):
    root = tmp_path / "odd"
    shutil.copytree(image_root, root)
    (root / "train" / "class_000" / "gone.jpg").symlink_to(root / "nowhere.jpg")
    (root / "train" / "class_001" / "folder.jpg").mkdir()
    reasons = {Path(path).name: reason for path, reason in scan(root).skipped}
    assert reasons == {"gone.jpg": "broken symbolic link", "folder.jpg": "a directory, not an image file"}


def test_index_cache_sees_files_overwritten_in_place_on_recheck(image_root, tmp_path):
    """Overwriting a file keeps its folder's mtime: a warm open (stamps of folders only) does not see it,
    `--recheck` looks at every file, as README says."""
    root = tmp_path / "cached"
    shutil.copytree(image_root, root)
    target = root / "train" / "class_000" / "train_000_00001.jpg"
    good = target.read_bytes()
    assert load_index(root).skipped == []
    folder_mtime = target.parent.stat().st_mtime_ns
    target.write_bytes(good[: len(good) // 2])  # truncated in place
    os.utime(target.parent, ns=(folder_mtime, folder_mtime))
    assert load_index(root).skipped == []  # the warm open trusts the folder's stamp
    assert [Path(p).name for p, _ in load_index(root, recheck=True).skipped] == [target.name]
    target.write_bytes(good)  # fixed in place
    os.utime(target.parent, ns=(folder_mtime, folder_mtime))
    assert load_index(root).skipped != []  # the recheck's verdict is cached ...
    result = subprocess.run([sys.executable, "-m", "resnest_train.data.index", str(root), "--recheck"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0 and "48 train and 20 val images, 0 skipped" in result.stdout, result.stderr
    assert load_index(root).skipped == [] and len(load_index(root).train) == 48  # ... until the next recheck


def test_warm_open_reads_no_file_and_rescans_only_changed_folders(image_root, tmp_path, monkeypatch):
    root = tmp_path / "warm"
    shutil.copytree(image_root, root)
    cold = load_index(root)
    assert (root / ".resnest_index.npz").is_file()
    listed = []
    real = index_table.scan_unit
    monkeypatch.setattr(index_table, "scan_unit", lambda task: listed.append(task[0]) or real(task))
    warm = load_index(root)
    assert listed == [] and list(warm.train) == list(cold.train) and list(warm.val) == list(cold.val)
    (root / "train" / "class_002" / "new.jpg").write_bytes((root / "train" / "class_002" / "train_002_00000.jpg")
                                                           .read_bytes())
    grown = load_index(root)
    assert listed == [str(root / "train" / "class_002")] and len(grown.train) == 49
    assert grown.train.path(24) == "train/class_002/new.jpg"


@pytest.mark.parametrize("layout,message", [
    ("file", "data.root is a file, not a folder"),
    ("flat_val", "holds images but no class folders (the raw ImageNet layout): sort it with "
                 "scripts/prepare_imagenet.py"),
])
def test_dataset_layout_messages(image_root, tmp_path, layout, message):
    if layout == "file":
        root = tmp_path / "root.txt"
        root.write_text("not a folder")
    else:
        root = tmp_path / "flat"
        shutil.copytree(image_root / "train", root / "train")
        (root / "val").mkdir()
        shutil.copy(next((image_root / "val" / "class_000").iterdir()), root / "val" / "ILSVRC2012_val_1.JPEG")
    with pytest.raises(DatasetError, match=re.escape(message)):
        load_index(root)


def _png_dataset(tmp_path, image: Image.Image, name: str = "a.png") -> Path:
    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
        image.save(tmp_path / split / "a" / name)
    return tmp_path


@pytest.mark.dali
def test_16_bit_png_and_exif_orientation_agree_across_backends(tmp_path):
    """16-bit greyscale: scaled to 8 bits (not clipped to white); EXIF orientation: ignored by both, as the
    reference evaluation (PIL/torchvision) does."""
    ramp = (np.linspace(0, 65535, 40 * 48).reshape(40, 48)).astype(np.uint16)
    root = _png_dataset(tmp_path / "grey16", Image.fromarray(ramp))
    rgb = Image.fromarray(photo_array(40, 48))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    for split in ("train", "val"):
        (tmp_path / "exif" / split / "a").mkdir(parents=True)
        rgb.save(tmp_path / "exif" / split / "a" / "a.jpg", quality=95, exif=exif)
    for folder in (root, tmp_path / "exif"):
        index = load_index(folder)
        plan = make_plan(folder, val_crop_size=32, val_resize_size=32)
        dali_images = next(iter(build_dali_val(plan, index.val, batch_size=1)))[0]
        torch_images = next(iter(build_torch_val(plan, index.val, batch_size=1)))[0]
        assert (dali_images - torch_images).abs().mean() < 0.05, folder
    grey = next(iter(build_torch_val(make_plan(root, val_crop_size=32, val_resize_size=32),
                                     load_index(root).val, batch_size=1)))[0]
    assert grey.std() > 0.5  # a ramp, not a white image


def photo_array(height: int, width: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 / width, y * 255 / height, 255 - x * 255 / width], -1).astype(np.uint8)


def test_torchvision_evaluation_drops_undecodable_images_instead_of_replacing_them(image_root, tmp_path):
    root = tmp_path / "broken"
    shutil.copytree(image_root, root)
    broken = sorted((root / "val" / "class_002").iterdir())[1]
    data = bytearray(broken.read_bytes())
    data[300:900] = bytes(600)  # valid header and end marker: passes the index's cheap check
    broken.write_bytes(bytes(data))
    index = load_index(root)
    plan = make_plan(root)
    loader = build_torch_val(plan, index.val, batch_size=8)
    seen = sum(len(targets) for _, targets in loader)
    assert seen == 19 and len(loader.delivered) == 19
    assert index.val.index((str(broken.relative_to(root)), 2)) not in loader.delivered


def test_torchvision_skips_and_names_an_image_over_the_decompression_bomb_limit(image_root, monkeypatch, caplog):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40 * 40 // 4)  # every 40x40 image is > 2x the limit
    index = load_index(image_root)
    loader = build_torch_val(make_plan(image_root, workers=0), index.val[:3], batch_size=3)
    assert list(loader) == [] and loader.delivered == []
    assert "skipping undecodable image" in caplog.text and index.val[0][0] in caplog.text


@pytest.mark.dali
def test_file_deleted_while_dali_trains_is_named(image_root, tmp_path):
    root = tmp_path / "vanishing"
    shutil.copytree(image_root, root)
    index = load_index(root)
    loader = build_dali_train(make_plan(root), index.train, make_order(48, 8))
    loader.set_epoch(0)
    for path, _ in index.train:
        (root / path).unlink()
    with pytest.raises(DatasetError, match="deleted since the dataset was indexed") as info:
        for epoch in range(2):
            epoch_labels(loader, epoch)
    named = [path for path, _ in index.train if str(root / path) in str(info.value)]
    # only the micro-batches that can have failed are searched: the one delivered and those prefetched
    assert 1 <= len(named) <= 4 * 8 and "Traceback" not in str(info.value)
