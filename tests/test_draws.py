"""Augmentation draws owned by the framework (data/draws.py): a function of (seed, epoch, sample, image
size) alone, torchvision's random-resized-crop rule, and the same draws on the DALI and torchvision
backends for the same sample."""

from __future__ import annotations

import math

import numpy as np
import pytest

from resnest_train.data.draws import crop_window, draw_batch, image_size
from resnest_train.data.index import load_index
from resnest_train.data.sample_read import read_sample
from resnest_train.data.torchvision import build_torch_train
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
