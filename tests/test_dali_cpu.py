"""DALI's CPU path: the torch/numpy/PIL ops a CPU pipeline runs on the host give PIL's/torchvision's
results, and the CPU graph that uses them gives the images DALI's own ops (the GPU graph's) give."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from resnest_train.data.index import load_index
from resnest_train.data.torchvision import val_transform
from tests.conftest import make_order, make_plan

pytest.importorskip("nvidia.dali", reason="DALI cannot be imported")

from resnest_train.data import dali  # noqa: E402
from resnest_train.data.dali_cpu import resize_one, saturate_one  # noqa: E402
from resnest_train.data.dali_train import build_dali_train  # noqa: E402


def photo_like(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth colour gradients plus texture: resampling differences show, flat colours would hide them."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([128 + 100 * np.sin(x / 17 + c) * np.cos(y / 23 - c) for c in range(3)], axis=-1)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("shape", [(300, 280), (97, 130)])  # down- and up-scaling
@pytest.mark.parametrize("mode,pil", [("bilinear", Image.BILINEAR), ("bicubic", Image.BICUBIC)])
def test_resize_matches_pil(shape, mode, pil):
    image = photo_like(*shape)
    ours = resize_one(image, 224, mode).astype(np.int16)
    reference = np.asarray(Image.fromarray(image).resize((224, 224), pil)).astype(np.int16)
    assert ours.shape == (224, 224, 3) and ours.flags.c_contiguous
    assert np.abs(ours - reference).max() <= 2 and np.abs(ours - reference).mean() < 0.5


@pytest.mark.parametrize("factor", [0.6, 1.0, 1.4])
def test_saturation_matches_torchvision(factor):
    image = photo_like(64, 48)
    ours = saturate_one(image, np.float32(factor)).astype(np.int16)
    reference = TF.adjust_saturation(torch.from_numpy(image).permute(2, 0, 1), factor).permute(1, 2, 0).numpy()
    assert np.abs(ours - reference.astype(np.int16)).max() <= 1


def _first_batch(root, plan, ops: str) -> torch.Tensor:
    loader = build_dali_train(plan, load_index(root).train, make_order(48, 8, seed=plan.seed), ops=ops)
    loader.set_epoch(0)
    return next(iter(loader))[0]


def _plan(root, **data):
    return make_plan(root, seed=5, workers=2, color_jitter=0.0, lighting=0.0, hflip=False, **data)


@pytest.mark.parametrize("autoaugment_on", ["crop", "image"])
def test_cpu_pipeline_matches_dali_ops(image_root, autoaugment_on):
    """Same seed, same crops: the host resize gives the images DALI's resize gives, within filter rounding
    (a wrong size, layout or channel order would be far off); for both crop paths of the graph."""
    plan = _plan(image_root, autoaugment="none", autoaugment_on=autoaugment_on)
    host, native = _first_batch(image_root, plan, "auto"), _first_batch(image_root, plan, "dali")
    assert host.shape == native.shape == (8, 3, 32, 32)
    assert (host - native).abs().mean() < 0.02  # normalised units: ~1 grey level
    assert (host - native.flip(-1)).abs().mean() > 0.2  # the check can tell a mirrored image


@pytest.mark.parametrize("autoaugment_on", ["crop", "image"])
@pytest.mark.parametrize("ops", ["auto", "dali"])
def test_autoaugment_on_both_pipeline_graphs(image_root, ops, autoaugment_on):
    """The CPU graph (host ops) and the GPU graph (`nvidia.dali.auto_aug`) both run here and augment, on the
    crop or on the whole image before it."""
    plain = _first_batch(image_root, _plan(image_root, autoaugment="none", autoaugment_on=autoaugment_on), ops)
    augmented = _first_batch(image_root, _plan(image_root, autoaugment="imagenet", autoaugment_on=autoaugment_on),
                             ops)
    assert augmented.shape == plain.shape == (8, 3, 32, 32)
    changed = ((augmented - plain).abs().mean(dim=(1, 2, 3)) > 0.05).sum()
    assert 1 <= changed <= 8


@pytest.mark.parametrize("ops,max_error,mean_error", [("auto", 0.02, 0.001), ("dali", 0.05, 0.01)],
                         ids=["cpu-graph", "gpu-graph"])
def test_val_pipeline_is_torchvision(tmp_path, ops, max_error, mean_error):
    """Validation = torchvision's Resize(int) + CenterCrop: within one grey level on the CPU graph (one level
    is 1/255/std = 0.017-0.0175 normalised, two would be 0.034; measured, 0.7% of these values are one level
    apart), to DALI's resampling differences on the GPU graph (lossless PNGs of sizes whose margins are odd,
    3 mod 4 included, where centre-crop conventions disagree, and whose longer side rounds up but truncates)."""
    sizes = [(40, 47), (45, 40), (41, 53), (52, 44)]
    for split in ("train", "val"):
        for i, (height, width) in enumerate(sizes):
            folder = tmp_path / split / f"class_{i % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(photo_like(height, width, seed=i)).save(folder / f"{i}.png")
    index = load_index(tmp_path)
    plan = make_plan(tmp_path, workers=2, val_resize_size=37)
    loader = dali.build_dali_val(plan, index.val, batch_size=4, ops=ops)
    images, _ = next(iter(loader))
    transform = val_transform(32, 37, "bilinear")
    for image, (path, _) in zip(images, index.val):
        error = (image - transform(Image.open(tmp_path / path).convert("RGB"))).abs()
        assert error.max() < max_error and error.mean() < mean_error, path
