"""Mixup and CutMix (mixing.py): timm's Mixup results bit for bit from the same numpy state, the draws of a
micro-batch from (seed, step, micro-batch) alone, whatever the process count, and CutMix's lambda equal to
the share of the image its clipped box leaves unpasted."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from timm.data import Mixup

from resnest_train.config import TrainConfig
from resnest_train.recipe.loss import build_mixup
from resnest_train.recipe.mixing import BatchMix, draw_box
from resnest_train.recipe.randomness import micro_batch_generator, seed_micro_batch
from tests.conftest import make_order

CLASSES = 5


def smooth(targets: torch.Tensor, smoothing: float = 0.1) -> torch.Tensor:
    return torch.nn.functional.one_hot(targets, CLASSES) * (1 - smoothing) + smoothing / CLASSES


def batch(seed: int = 0, size: int = 6, height: int = 12, width: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(size, 3, height, width, generator=generator),
            torch.randint(0, CLASSES, (size,), generator=generator))


def mixes(**options) -> tuple[BatchMix, Mixup]:
    """Ours and timm's Mixup (batch mode, correct_lam) with the same options."""
    ours = BatchMix(num_classes=CLASSES, label_smoothing=0.1, **options)
    theirs = Mixup(mixup_alpha=options["mixup_alpha"], cutmix_alpha=options["cutmix_alpha"],
                   prob=options["mix_prob"], switch_prob=options["switch_prob"], mode="batch", correct_lam=True,
                   label_smoothing=0.1, num_classes=CLASSES)
    return ours, theirs


@pytest.mark.parametrize("options", [
    dict(mixup_alpha=0.2, cutmix_alpha=0.0, mix_prob=1.0, switch_prob=0.5),  # the recipe's
    dict(mixup_alpha=0.0, cutmix_alpha=1.0, mix_prob=1.0, switch_prob=0.5),
    dict(mixup_alpha=0.1, cutmix_alpha=1.0, mix_prob=1.0, switch_prob=0.5),
    dict(mixup_alpha=0.8, cutmix_alpha=1.0, mix_prob=0.6, switch_prob=0.3),
])
def test_same_images_targets_and_draws_as_timm(options):
    ours, theirs = mixes(**options)
    images, targets = batch()
    kinds = set()
    for seed in range(60):
        np.random.seed(seed)
        expected_images, expected_targets = theirs(images.clone(), targets)
        rng = np.random.RandomState(seed)
        draw = ours.draw(np.random.RandomState(seed), *images.shape[-2:])
        kinds.add("cutmix" if draw.box else "mixup" if draw.lam != 1.0 else "none")
        mixed, soft = ours(images, targets, rng)
        assert torch.equal(mixed, expected_images) and torch.equal(soft, expected_targets), seed
        # as many draws as timm's: the generator ends where numpy's global one does
        assert rng.get_state()[2] == np.random.get_state()[2]
        assert np.array_equal(rng.get_state()[1], np.random.get_state()[1])
    wanted = {"mixup"} if options["cutmix_alpha"] == 0 else {"cutmix"} if options["mixup_alpha"] == 0 else \
        {"mixup", "cutmix"}
    assert wanted <= kinds  # every branch this configuration can take was compared
    assert options["mix_prob"] == 1 or "none" in kinds


def test_the_recipe_mixes_as_timm_did_from_the_global_generator():
    """Default config: the lambdas of the runs before this module existed (timm's Mixup after
    `seed_micro_batch`) come from `micro_batch_generator` of the same micro-batch."""
    config = TrainConfig()
    ours = build_mixup(config, CLASSES)
    theirs = Mixup(mixup_alpha=0.2, cutmix_alpha=0.0, prob=1.0, mode="batch", label_smoothing=0.1,
                   num_classes=CLASSES)
    images, targets = batch()
    for step, micro_batch in [(0, 0), (0, 3), (7, 1), (12345, 63)]:
        seed_micro_batch(config.seed, step, micro_batch)
        expected = theirs(images.clone(), targets)
        actual = ours(images, targets, micro_batch_generator(config.seed, step, micro_batch))
        assert torch.equal(actual[0], expected[0]) and torch.equal(actual[1], expected[1])


@pytest.mark.parametrize("world_size", [2, 4])
def test_each_micro_batch_mixed_the_same_on_any_process_count(world_size):
    """The runner's keys (seed, step, order.micro_batch_index) on 1 process (accumulation 4) and on
    `world_size`: every micro-batch of every step gets the same images, box and targets."""
    mix = BatchMix(mixup_alpha=0.1, cutmix_alpha=1.0, mix_prob=0.8, switch_prob=0.5, label_smoothing=0.1,
                   num_classes=CLASSES)
    pool, labels = batch(size=64)

    def mixed_by_index(processes: int) -> dict:
        out = {}
        for rank in range(processes):
            order = make_order(64, 4, world_size=processes, rank=rank, global_batch=16, seed=3)
            samples = order.rank_samples(0).view(-1, order.layout.accumulation, 4)  # (steps, micro-steps, b)
            for step, micro_step in np.ndindex(*samples.shape[:2]):
                index = order.micro_batch_index(micro_step)
                chosen = samples[step, micro_step]
                result = mix(pool[chosen], labels[chosen], micro_batch_generator(3, int(step), index))
                out[int(step), index] = result
        return out

    one, many = mixed_by_index(1), mixed_by_index(world_size)
    assert one.keys() == many.keys() and len(one) == 4 * 4
    for key in one:
        assert all(torch.equal(a, b) for a, b in zip(one[key], many[key])), key
    assert len({round(float(soft.max()), 6) for _, soft in one.values()}) > 4  # draws differ by micro-batch


def test_cutmix_lambda_is_the_unpasted_share_of_the_image():
    mix = BatchMix(mixup_alpha=0.0, cutmix_alpha=1.0, mix_prob=1.0, switch_prob=0.5, label_smoothing=0.1,
                   num_classes=CLASSES)
    images, targets = batch()
    height, width = images.shape[-2:]
    clipped = 0
    for seed in range(100):
        draw = mix.draw(np.random.RandomState(seed), height, width)
        top, bottom, left, right = draw.box
        area = (bottom - top) * (right - left)
        assert draw.lam == pytest.approx(1 - area / (height * width), abs=1e-12)
        mixed, soft = mix(images, targets, np.random.RandomState(seed))
        inside = torch.zeros(height, width, dtype=torch.bool)
        inside[top:bottom, left:right] = True
        assert torch.equal(mixed[..., inside], images.flip(0)[..., inside])  # the mirror image's box
        assert torch.equal(mixed[..., ~inside], images[..., ~inside])  # the rest untouched
        expected = draw.lam * smooth(targets) + (1 - draw.lam) * smooth(targets.flip(0))
        torch.testing.assert_close(soft, expected)
        clipped += top == 0 or left == 0 or bottom == height or right == width
    assert clipped > 0  # the correction was exercised


def test_box_sides_follow_timm_rand_bbox():
    """Unclipped, a box has sides int(side x sqrt(1 - lam)); at the border it is cut, never larger."""
    rng = np.random.RandomState(0)
    for lam in np.linspace(0.05, 0.95, 40):
        cut_h, cut_w = int(12 * np.sqrt(1 - lam)), int(20 * np.sqrt(1 - lam))
        top, bottom, left, right = draw_box(rng, 12, 20, lam)
        assert 0 <= top <= bottom <= 12 and 0 <= left <= right <= 20
        assert bottom - top <= cut_h and right - left <= cut_w
        if 0 < top and bottom < 12:
            assert bottom - top == cut_h
        if 0 < left and right < 20:
            assert right - left == cut_w


@pytest.mark.parametrize("switch_prob, cutmix", [(0.0, False), (1.0, True)])
def test_switch_probability(switch_prob, cutmix):
    mix = BatchMix(mixup_alpha=0.5, cutmix_alpha=1.0, mix_prob=1.0, switch_prob=switch_prob,
                   label_smoothing=0.1, num_classes=CLASSES)
    draws = [mix.draw(np.random.RandomState(seed), 12, 20) for seed in range(30)]
    assert all((draw.box is not None) == cutmix for draw in draws)


def test_mix_probability_zero_keeps_images_and_smooths_targets():
    mix = BatchMix(mixup_alpha=0.2, cutmix_alpha=1.0, mix_prob=0.0, switch_prob=0.5, label_smoothing=0.1,
                   num_classes=CLASSES)
    images, targets = batch()
    mixed, soft = mix(images, targets, np.random.RandomState(0))
    assert torch.equal(mixed, images)
    torch.testing.assert_close(soft, smooth(targets))


def test_the_loader_batch_is_not_changed_in_place():
    images, targets = batch()
    before = images.clone()
    for cutmix_alpha, mixup_alpha in [(1.0, 0.0), (0.0, 1.0)]:
        mix = BatchMix(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, mix_prob=1.0, switch_prob=0.5,
                       label_smoothing=0.1, num_classes=CLASSES)
        assert not all(torch.equal(mix(images, targets, np.random.RandomState(seed))[0], images)
                       for seed in range(5))
    assert torch.equal(images, before)


def test_no_mix_without_an_alpha():
    assert build_mixup(TrainConfig(mixup_alpha=0.0), CLASSES) is None
    assert build_mixup(TrainConfig(mixup_alpha=0.0, cutmix_alpha=1.0), CLASSES).cutmix_alpha == 1.0
