"""The training crop rules (data/crops.py, `data.crop`): the efficientnet window obeys ResNeSt's ERandomCrop
(TensorFlow's sample_distorted_bounding_box) bounds and falls back to ECenterCrop; inception is
torchvision's window with timm's per-image random interpolation; every rule's draws depend on (seed,
epoch, sample) alone; DALI and torchvision cut the same window of every image and resize it with the same
drawn interpolation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from resnest_train.data.crops import INTERPOLATIONS, center_window, efficientnet_window
from resnest_train.data.draws import draw_batch
from resnest_train.data.index import load_index
from resnest_train.data.torchvision import build_torch_train
from resnest_train.data.torchvision_augment import TrainAugment
from tests.conftest import dali_importable, make_order, make_plan

PLAIN = {"autoaugment": "none", "color_jitter": 0.0, "lighting": 0.0}


def efficientnet_windows(min_area: float, count: int, seed: int = 0) -> list[tuple[int, int, list[int]]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        height = int(rng.integers(24, 500))
        width = int(height * rng.uniform(0.6, 1.7))  # photographs' shapes (ImageNet's are within these)
        out.append((height, width, efficientnet_window(rng, height, width, min_area, 224)))
    return out


@pytest.mark.parametrize("min_area", [0.1, 0.5])
def test_efficientnet_windows_obey_the_area_and_ratio_bounds(min_area):
    areas, fallbacks = [], 0
    for height, width, (top, left, h, w) in efficientnet_windows(min_area, 1500):
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width and h > 0 and w > 0
        if [top, left, h, w] == center_window(height, width, 224):
            fallbacks += 1
            continue
        area = h * w / (height * width)
        assert max(min_area, 0.1) <= area < 1  # the whole image is never a window: it falls back
        # width = round(height x ratio), ratio uniform in [3/4, 4/3]: within half a pixel of the range
        assert 3 / 4 - 0.5 / h <= w / h <= 4 / 3 + 0.5 / h
        areas.append(area)
    assert min(areas) < min_area + 0.05 and max(areas) > 0.9  # the whole range is drawn
    assert fallbacks < 0.01 * 1500  # ten tries nearly always find a window on such shapes


def test_efficientnet_falls_back_to_ecentercrop():
    rng = np.random.default_rng(1)
    # no window of ratio 3/4..4/3 covers 10 % of a 10 x 1000 sliver: ten failed tries
    assert efficientnet_window(rng, 10, 1000, 0.1, 224) == center_window(10, 1000, 224) == [1, 496, 9, 9]
    # on a small image the whole image is often drawn: it is never returned, the centre crop is
    windows = [efficientnet_window(rng, 12, 12, 0.1, 224) for _ in range(300)]
    assert [0, 0, 12, 12] not in windows and center_window(12, 12, 224) in windows


def test_center_window_is_ecentercrops_pil_box():
    """ECenterCrop: the float box (left, top, left + side, top + side) of side crop/(crop + 32) of the shorter
    side, cut by PIL (which rounds each coordinate)."""
    pixels = np.random.default_rng(0).integers(0, 255, (375, 500, 3), dtype=np.uint8)
    for crop_size in (224, 320):
        side = crop_size / (crop_size + 32) * 375
        top, left = int(round((375 - side) / 2)), int(round((500 - side) / 2))
        reference = np.asarray(Image.fromarray(pixels).crop((left, top, left + side, top + side)))
        t, le, h, w = center_window(375, 500, crop_size)
        assert np.array_equal(pixels[t:t + h, le:le + w], reference)
    assert center_window(375, 500, 224) == [23, 86, 328, 328]


def test_inception_is_torchvisions_window_with_a_drawn_interpolation(tmp_path):
    inception, plain = (make_plan(tmp_path, crop=crop, **PLAIN) for crop in ("inception", "random_resized"))
    sizes = [(40 + i % 7, 60 - i % 5) for i in range(200)]
    drawn = draw_batch(inception, 2, list(range(200)), sizes)
    assert np.array_equal(drawn.crop, draw_batch(plain, 2, list(range(200)), sizes).crop)
    assert plain.crop == "random_resized" and draw_batch(plain, 2, [0], [(40, 40)]).interp is None
    assert set(drawn.interp.tolist()) == {0, 1} and 60 < drawn.interp.sum() < 140  # timm: one of two at random


@pytest.mark.parametrize("crop", ["random_resized", "inception", "efficientnet"])
def test_crop_draws_depend_on_seed_epoch_and_sample_only(tmp_path, crop):
    plan = make_plan(tmp_path, crop=crop, crop_min_area=0.2, autoaugment="imagenet", crop_size=224)
    first = draw_batch(plan, 1, [5, 9], [(375, 500), (333, 1000)])
    again = draw_batch(plan, 1, [9, 5], [(333, 1000), (375, 500)])  # another batch, another order
    assert first.row(0) == again.row(1) and first.row(1) == again.row(0)
    assert draw_batch(plan, 2, [5], [(375, 500)]).row(0) != first.row(0)  # the next epoch draws anew
    assert draw_batch(make_plan(tmp_path, crop=crop, seed=1), 1, [5], [(375, 500)]).row(0) != first.row(0)


def test_torchvision_resizes_with_the_drawn_interpolation(tmp_path):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (61, 83, 3), dtype=np.uint8))
    draws = draw_batch(make_plan(tmp_path, crop="inception", **PLAIN), 0, [0], [(61, 83)]).row(0)
    for interp, name in enumerate(INTERPOLATIONS):
        fixed = TrainAugment(make_plan(tmp_path, interpolation=name, **PLAIN))
        drawn = TrainAugment(make_plan(tmp_path, crop="inception", **PLAIN))
        plain = {key: value for key, value in draws.items() if key != "interp"}
        assert torch.equal(drawn(image, {**draws, "interp": interp}), fixed(image, plain))


def epoch_draws(loader, epoch: int, per_batch: int) -> dict:
    """(sample, copy) -> the draws the loader used for it in `epoch`."""
    loader.set_epoch(epoch)
    draws = {}
    for _ in loader:
        batch = loader.last_draws
        rows = [batch.row(i) for i in range(per_batch)] if hasattr(batch, "row") else batch
        draws.update(((sample, row.get("repeat", 0)), row) for sample, row in zip(loader.last_samples.tolist(), rows))
    return draws


@pytest.mark.skipif(not dali_importable(), reason="DALI cannot be imported")
@pytest.mark.parametrize("crop", ["inception", "efficientnet"])
def test_dali_and_torchvision_cut_the_same_window_of_each_image(image_root, crop):
    from resnest_train.data.dali_train import build_dali_train
    index = load_index(image_root)
    plan = make_plan(image_root, crop=crop, crop_min_area=0.3, color_jitter=0.4, workers=0)
    dali, torchvision = (epoch_draws(build(plan, index.train, make_order(48, 8)), 1, 8)
                         for build in (build_dali_train, build_torch_train))
    assert len(dali) == 48 and dali == torchvision
    assert {tuple(row["crop"]) for row in dali.values()} != {(0, 0, 40, 40)}  # windows, not whole images


@pytest.mark.skipif(not dali_importable(), reason="DALI cannot be imported")
@pytest.mark.parametrize("ops", ["auto", "dali"], ids=["cpu-graph", "gpu-graph"])
def test_dali_resizes_each_image_with_its_drawn_interpolation(image_root, ops):
    """inception's window is random_resized's: its images equal those of the fixed interpolation each one drew,
    exactly (the same resize op)."""
    from resnest_train.data.dali_train import build_dali_train
    index = load_index(image_root)

    def first_batch(**data):
        plan = make_plan(image_root, seed=5, workers=1, hflip=False, **PLAIN, **data)
        loader = build_dali_train(plan, index.train, make_order(48, 8, seed=5), ops=ops)
        loader.set_epoch(0)
        return next(iter(loader))[0], loader.last_draws
    drawn, draws = first_batch(crop="inception")
    fixed = [first_batch(interpolation=name)[0] for name in INTERPOLATIONS]
    assert set(draws.interp.tolist()) == {0, 1}
    for i, interp in enumerate(draws.interp.tolist()):
        assert torch.equal(drawn[i], fixed[interp][i]) and not torch.equal(drawn[i], fixed[1 - interp][i])
