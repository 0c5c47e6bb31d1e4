"""The dataset index and the real DALI (CPU, device_id=None) and torchvision pipelines on generated JPEGs."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from resnest_train.data import resize_size
from resnest_train.data.dali import build_dali_train, build_dali_val
from resnest_train.data.index import DatasetError, load_index, scan
from resnest_train.data.torchvision import build_torch_train, build_torch_val, val_transform
from resnest_train.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from tests.conftest import make_plan


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


def test_dali_train_batches(image_root):
    index = load_index(image_root)
    loader = build_dali_train(make_plan(image_root, autoaugment="none"), index.train, batch_size=8)
    assert len(loader) == 6
    batches = list(loader)
    assert len(batches) == 6
    images, targets = batches[0]
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32 and targets.dtype == torch.int64
    assert -3 < images.mean() < 3 and images.std() > 0.3  # normalised, not raw 0-255
    labels = torch.cat([t for _, t in batches])
    assert sorted(labels.tolist()) == sorted(label for _, label in index.train)  # one epoch = every image


def test_dali_channels_last_layout(image_root):
    loader = build_dali_train(make_plan(image_root, channels_last=True), load_index(image_root).train, batch_size=8)
    images = next(iter(loader))[0]
    assert images.shape == (8, 3, 32, 32) and images.is_contiguous(memory_format=torch.channels_last)


def epoch_labels(loader):
    return [t.tolist() for _, t in loader]


def test_dali_shards_equal_batches_different_augmentation(image_root):
    index = load_index(image_root)
    # 48 images, 5 ranks: uneven shards (10/10/10/9/9) must still give every rank the same batch count.
    lengths = []
    for rank in range(5):
        loader = build_dali_train(make_plan(image_root, rank=rank, world_size=5), index.train, batch_size=4)
        lengths.append((len(loader), len(list(loader)), len(list(loader))))
    assert len(set(lengths)) == 1 and lengths[0][0] == 2
    first = [build_dali_train(make_plan(image_root, rank=r, world_size=2), index.train, batch_size=4)
             for r in range(2)]
    a, b = (next(iter(loader))[0] for loader in first)
    assert not torch.equal(a, b)  # ranks never repeat each other's augmentation


def test_dali_reproducible_and_reshuffled(image_root):
    index = load_index(image_root)
    make = lambda seed=3: build_dali_train(make_plan(image_root, seed=seed), index.train, batch_size=8)  # noqa: E731
    one, two = make(), make()
    e1, e2 = [torch.cat([x for x, _ in one]) for _ in range(2)]
    assert torch.equal(e1, torch.cat([x for x, _ in two]))  # same seed, same first epoch
    assert not torch.equal(e1, e2)  # the next epoch differs
    order = lambda loader: torch.cat([t for _, t in loader]).tolist()  # noqa: E731
    assert order(make(3)) != order(make(4))  # train.seed changes the data order, not only the augmentation


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
    loader = build_torch_train(make_plan(image_root, world_size=2), index.train, batch_size=8)
    assert len(loader) == 3
    loader.set_epoch(0)
    full = epoch_labels(loader)
    resumed = build_torch_train(make_plan(image_root, world_size=2), index.train, batch_size=8,
                                state={"epoch": 0, "position": 1})
    resumed.set_epoch(0)
    assert len(resumed) == 3 and epoch_labels(resumed) == full[1:]
    plan = make_plan(image_root, rank=1, world_size=3)
    val = build_torch_val(plan, plan.shard(index.val), batch_size=8)
    assert sum(len(t) for _, t in val) == math.ceil((20 - 1) / 3)
