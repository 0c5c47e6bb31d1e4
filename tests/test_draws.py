"""Augmentation draws owned by the framework (data/draws.py): a function of (seed, epoch, sample, image
size) alone, torchvision's random-resized-crop rule, and the same draws on the DALI and torchvision
backends for the same sample."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from resnest_train.data.crops import crop_window
from resnest_train.data.draws import draw_batch, image_size
from resnest_train.data.index import load_index
from resnest_train.data.sample_read import read_sample
from resnest_train.data.torchvision import build_torch_train
from resnest_train.data.torchvision_augment import TrainAugment
from tests.conftest import dali_importable, make_order, make_plan


def test_draws_depend_on_seed_epoch_and_sample_only(image_root):
    plan = make_plan(image_root, autoaugment="imagenet", color_jitter=0.4, lighting=0.1)
    first = draw_batch(plan, 1, [5, 9], [(40, 40), (30, 50)])
    again = draw_batch(plan, 1, [9, 5], [(30, 50), (40, 40)])  # another batch, another order
    assert first.row(0) == again.row(1) and first.row(1) == again.row(0)
    assert draw_batch(plan, 2, [5], [(40, 40)]).row(0) != first.row(0)  # the next epoch draws anew
    assert draw_batch(make_plan(image_root, seed=1), 1, [5], [(40, 40)]).row(0) != first.row(0)
    rows = [draw_batch(plan, 0, [i], [(40, 40)]).row(0) for i in range(200)]
    assert {row["flip"] for row in rows} == {0, 1} and {row["sub_policy"] for row in rows} == set(range(25))
    assert all(0.6 <= f <= 1.4 for row in rows for f in row["jitter"])


def test_crop_window_follows_torchvisions_rule():
    rng = np.random.default_rng(0)
    for _ in range(500):
        height, width = (int(v) for v in rng.integers(8, 400, 2))
        top, left, h, w = crop_window(rng, height, width, (0.08, 1.0))
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width and h > 0 and w > 0
    # a sliver no ratio in [3/4, 4/3] fits at that scale: the centre at the clamped ratio, as torchvision
    assert crop_window(rng, 10, 1000, (0.9, 1.0)) == [0, (1000 - round(10 * 4 / 3)) // 2, 10, round(10 * 4 / 3)]
    areas = [math.prod(crop_window(rng, 300, 300, (0.5, 0.6))[2:]) / 300**2 for _ in range(200)]
    assert 0.48 <= min(areas) and max(areas) <= 0.62  # the scale range, up to rounding of h and w


def test_image_size_reads_the_header(image_root):
    index = load_index(image_root)
    assert image_size(read_sample(image_root, index.train, 0)) == (40, 40)


@pytest.mark.skipif(not dali_importable(), reason="DALI cannot be imported")
def test_dali_and_torchvision_get_the_same_draws_for_each_sample(image_root):
    from resnest_train.data.dali_train import build_dali_train
    index = load_index(image_root)
    plan = make_plan(image_root, autoaugment="imagenet", color_jitter=0.4, lighting=0.1, workers=0)
    loaders = [build_dali_train(plan, index.train, make_order(48, 8)), build_torch_train(plan, index.train,
                                                                                         make_order(48, 8))]
    seen = []
    for loader in loaders:
        loader.set_epoch(1)
        draws = {}
        for _ in loader:
            batch = loader.last_draws
            rows = [batch.row(i) for i in range(8)] if hasattr(batch, "row") else batch
            draws.update(zip(loader.last_samples.tolist(), rows))
        seen.append(draws)
    assert len(seen[0]) == 48 and seen[0] == seen[1]


# Draws and torchvision images of the AutoAugment tables and of no augmentation, computed at 620cf1d (before
# RandAugment added its draws): RandAugment draws only when it is on, so these stay bit for bit.
GOLDEN_DRAWS = {
    ("imagenet", 0): [
        {"crop": [5, 3, 25, 28], "flip": 1, "jitter": [1.222204327583313, 0.6777508854866028, 0.7334698438644409],
         "lighting": [0.0791841596364975, 0.12018468230962753, -0.040673915296792984], "sub_policy": 3,
         "run": [0.176829993724823, 0.4158669412136078], "negate": [1, 1]},
        {"crop": [67, 161, 211, 176], "flip": 1,
         "jitter": [1.2519176006317139, 0.9508485794067383, 0.7131200432777405],
         "lighting": [-0.19915637373924255, 0.09724583476781845, -0.014473061077296734], "sub_policy": 12,
         "run": [0.9539476037025452, 0.29169777035713196], "negate": [0, 0]},
        {"crop": [32, 516, 250, 320], "flip": 1,
         "jitter": [1.3206721544265747, 0.8702634572982788, 0.9574438333511353],
         "lighting": [0.08336073905229568, -0.08811789005994797, -0.1394336074590683], "sub_policy": 1,
         "run": [0.18198300898075104, 0.4546979069709778], "negate": [1, 0]}],
    ("none", 11): [
        {"crop": [3, 2, 37, 32], "flip": 1, "jitter": [1.1130993366241455, 1.1191147565841675, 0.7437001466751099],
         "lighting": [0.010990902781486511, -0.027277112007141113, -0.10723700374364853], "sub_policy": 0,
         "run": [0.7456726431846619, 0.21069970726966858], "negate": [1, 0]},
        {"crop": [22, 136, 323, 350], "flip": 1,
         "jitter": [0.9066880941390991, 1.2597851753234863, 1.3557711839675903],
         "lighting": [-0.08130975812673569, -0.023232923820614815, 0.06755553185939789], "sub_policy": 0,
         "run": [0.705325722694397, 0.18375754356384277], "negate": [0, 0]},
        {"crop": [112, 473, 154, 197], "flip": 1,
         "jitter": [0.9401902556419373, 0.896422803401947, 1.3480217456817627],
         "lighting": [-0.012651626020669937, -0.019024455919861794, -0.0021575058344751596], "sub_policy": 0,
         "run": [0.7707490921020508, 0.4938935339450836], "negate": [1, 1]}],
    ("gluon", 5): [
        {"crop": [10, 5, 29, 33], "flip": 1, "jitter": [0.6141196489334106, 0.9808802604675293, 1.1368062496185303],
         "lighting": [-0.11393237859010696, -0.13813528418540955, -0.14746294915676117], "sub_policy": 10,
         "run": [0.1093900054693222, 0.3936727046966553], "negate": [1, 1]},
        {"crop": [51, 111, 199, 210], "flip": 0,
         "jitter": [0.7878417372703552, 0.6595146059989929, 0.7785006165504456],
         "lighting": [0.018510404974222183, -0.11021962016820908, 0.1068914458155632], "sub_policy": 18,
         "run": [0.6728660464286804, 0.42547276616096497], "negate": [0, 0]},
        {"crop": [36, 181, 270, 292], "flip": 0,
         "jitter": [0.7266446948051453, 0.9872735142707825, 1.044585943222046],
         "lighting": [0.13568809628486633, -0.16265903413295746, -0.13537263870239258], "sub_policy": 15,
         "run": [0.5904350280761719, 0.9219615459442139], "negate": [1, 0]}],
}
# TrainAugment's tensors for samples 0..5 of epoch 2 on one 61 x 83 image (seed 0, 32 px crops), written by
# the code of 620cf1d (tests/golden/train_augment_620cf1d.npz, one array per policy and place). Compared
# within 1e-4, not bit for bit: sha256 pins of these tensors held on an Intel machine and not on an AMD one
# with the same code (float kernels and the old test image's float sines round differently per CPU), while a
# change of the augmentation moves a pixel by at least one grey level, 1 / 255 / 0.229 = 0.017 here.
GOLDEN_IMAGES = Path(__file__).parent / "golden" / "train_augment_620cf1d.npz"


def stable_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Ramps, integer noise and pixels clipped at 15 and 235, built from integers only (the same bytes on
    every CPU, unlike float sines), with a low-contrast band."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * 5 + y * 3 + 60 * c) % 220 for c in range(3)], axis=-1) + 18
    image = np.clip(base + rng.integers(-25, 26, base.shape), 15, 235)
    image[:, :9] = image[:, :9] * 2 // 5 + 70
    return image.astype(np.uint8)


@pytest.mark.parametrize("policy,seed", sorted(GOLDEN_DRAWS))
def test_autoaugment_and_no_augment_draws_are_unchanged(tmp_path, policy, seed):
    plan = make_plan(tmp_path, seed=seed, autoaugment=policy, color_jitter=0.4, lighting=0.1, crop_size=224)
    draws = draw_batch(plan, 3, [0, 7, 123456], [(40, 40), (375, 500), (333, 1000)])
    assert [draws.row(i) for i in range(3)] == GOLDEN_DRAWS[policy, seed]


@pytest.mark.parametrize("policy,where", [("imagenet", "image"), ("imagenet", "crop"), ("none", "image")])
def test_autoaugment_and_no_augment_images_are_unchanged(tmp_path, policy, where):
    plan = make_plan(tmp_path, autoaugment=policy, autoaugment_on=where, color_jitter=0.4, lighting=0.1)
    augment, image = TrainAugment(plan), Image.fromarray(stable_image(61, 83))
    ours = np.stack([augment(image, draw_batch(plan, 2, [sample], [(61, 83)]).row(0)).numpy()
                     for sample in range(6)])
    golden = np.load(GOLDEN_IMAGES)[f"{policy}-{where}"]
    np.testing.assert_allclose(ours, golden, rtol=0, atol=1e-4)
