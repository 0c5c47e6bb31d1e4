"""Repeated augmentation (`train.repeated_augment`, data/order.py): each image k times in the epoch's list,
cut to the list's length (timm's RepeatAugSampler); the same global micro-batches on any process count and
after a mid-epoch resume; each copy augmented with its own draws, on both backends; a training run with it
resumes mid-epoch bit-identically."""

from __future__ import annotations

import json
from collections import Counter, defaultdict

import pytest
import torch

from resnest_train.data.draws import draw_batch
from resnest_train.data.index import load_index
from resnest_train.data.reader import EpochCursor
from resnest_train.data.torchvision import build_torch_train
from resnest_train.recipe.randomness import epoch_permutation
from tests.conftest import dali_importable, make_order, make_plan, script_env
from tests.test_crops import epoch_draws
from tests.test_resume import (
    assert_bit_identical,
    final_weights,
    kill_after_step_2_and_resume,
    run_train,
    tiny_args,
)


def test_the_epoch_list_repeats_each_image_and_keeps_its_length():
    order = make_order(50, 5, global_batch=10, repeats=3)
    permutation = epoch_permutation(0, 1, 50)
    repeated = permutation.repeat_interleave(3)  # the list before the cut: every image k times
    assert Counter(repeated.tolist()) == {image: 3 for image in range(50)}
    listed = order.epoch_order(1)
    assert torch.equal(listed, repeated[:50])  # timm: the first len(dataset) of the repeated list
    counts = Counter(listed.tolist())  # 50 = 16 x 3 + 2: the permutation's first 16 images 3 times, the 17th twice
    assert list(counts) == permutation[:17].tolist() and list(counts.values()) == [3] * 16 + [2]
    assert order.steps_per_epoch == 5 and torch.equal(make_order(50, 5, global_batch=10).epoch_order(1), permutation)


def global_micro_batches(world_size: int, start_step: int = 0, repeats: int = 3) -> dict:
    """(step, micro-batch) -> (samples, copies) of epoch 2, read by every rank of `world_size` from
    `start_step` (48 images, global batch 16, micro-batches of 4: M = 4 per step)."""
    out = {}
    for rank in range(world_size):
        order = make_order(48, 4, world_size=world_size, rank=rank, global_batch=16, repeats=repeats)
        reader = EpochCursor(order, start=(2, start_step))
        for row, samples in enumerate(reader.set_epoch(2)):
            step, micro_step = divmod(row, order.layout.accumulation)
            copies = reader.repeats[row].tolist() if reader.repeats is not None else [0] * len(samples)
            out[start_step + step, order.micro_batch_index(micro_step)] = (tuple(samples.tolist()), tuple(copies))
    return out


def test_process_counts_read_the_same_global_micro_batches_with_repeats():
    one = global_micro_batches(1)
    assert one == global_micro_batches(2) == global_micro_batches(4) and len(one) == 3 * 4
    order = make_order(48, 4, global_batch=16, repeats=3)
    assert Counter(s for samples, _ in one.values() for s in samples) == Counter(order.epoch_order(2).tolist())
    copies = [(s, r) for samples, repeats in one.values() for s, r in zip(samples, repeats)]
    assert len(set(copies)) == 48  # each (image, copy) once
    places = defaultdict(set)  # the copies of an image: in different micro-batches (M = 4 >= k = 3)
    for (step, micro_batch), (samples, _) in one.items():
        for sample in samples:
            places[sample].add((step, micro_batch))
    assert all(len(where) == Counter(order.epoch_order(2).tolist())[s] for s, where in places.items())


def test_without_repeats_the_order_is_dealt_as_before():
    """k = 1: the permutation's steps cut into micro-batches of consecutive images, micro-batch m to process
    m mod W (the formula order.py used before repeats), no copies."""
    for world_size in (1, 2, 4):
        for rank in range(world_size):
            order = make_order(48, 4, world_size=world_size, rank=rank, global_batch=16)
            steps = order.epoch_order(2)[16:48].view(-1, order.layout.accumulation, world_size, 4)
            assert torch.equal(order.rank_samples(2, start_step=1), steps[:, :, rank, :].reshape(-1))
            assert order.rank_repeats(1) is None


def test_a_mid_epoch_resume_continues_the_same_sequence():
    order = make_order(48, 4, world_size=2, rank=1, global_batch=16, repeats=3)
    full, resumed = EpochCursor(order, start=(2, 0)), EpochCursor(order, start=(2, 1))
    rows, rest = full.set_epoch(2), resumed.set_epoch(2)
    skip = order.layout.accumulation  # one step of this rank's micro-batches
    assert (rest == rows[skip:]).all() and (resumed.repeats == full.repeats[skip:]).all()
    assert resumed.state() == {"order": 1, "epoch": 2, "step": 1}
    # the rest of the epoch on another process count: the same global micro-batches
    uninterrupted = {key: value for key, value in global_micro_batches(1).items() if key[0] >= 1}
    assert global_micro_batches(2, start_step=1) == global_micro_batches(4, start_step=1) == uninterrupted


def test_each_copy_has_its_own_draws(image_root):
    plan = make_plan(image_root, autoaugment="imagenet", color_jitter=0.4, lighting=0.1)
    sizes = [(375, 500)] * 3
    copies = draw_batch(plan, 1, [7, 7, 7], sizes, [0, 1, 2])
    rows = [copies.row(i) for i in range(3)]
    assert [row.pop("repeat") for row in rows] == [0, 1, 2]
    assert all(rows[i]["crop"] != rows[j]["crop"] and rows[i] != rows[j] for i, j in ((0, 1), (0, 2), (1, 2)))
    assert rows[0] == draw_batch(plan, 1, [7], sizes[:1]).row(0)  # copy 0: an unrepeated image's draws
    assert draw_batch(plan, 1, [7, 7], sizes[:2], [2, 1]).row(0) == copies.row(2)  # from (seed, epoch, sample, copy)


@pytest.mark.skipif(not dali_importable(), reason="DALI cannot be imported")
def test_dali_and_torchvision_draw_the_same_for_every_copy(image_root):
    """k = 2 with 2 micro-batches per step: both micro-batches of a step hold the same images (other copies),
    which DALI's feed tells apart by the order it issued them."""
    from resnest_train.data.dali_train import build_dali_train
    index = load_index(image_root)
    plan = make_plan(image_root, autoaugment="imagenet", color_jitter=0.4, lighting=0.1, workers=0)
    order = make_order(48, 8, global_batch=16, repeats=2)
    dali, torchvision = (epoch_draws(build(plan, index.train, order), 1, 8)
                         for build in (build_dali_train, build_torch_train))
    assert len(dali) == 48 and dali == torchvision
    assert {copy for _, copy in dali} == {0, 1} and len({sample for sample, _ in dali}) == 24
    assert all(dali[sample, 0]["crop"] != dali[sample, 1]["crop"] for sample, copy in dali if copy == 0)


# data.workers=0: a DataLoader worker forked by the trainer shares its run-folder lock (flock) and outlives a
# kill -9 by a few seconds, during which the restart would be refused as a second run in the folder.
REPEATS = ["data.backend=torchvision", "data.workers=0", "train.repeated_augment=3",
           "train.batch_size=4", "train.global_batch=8"]  # 2 micro-batches per step


@pytest.mark.slow
def test_repeated_augment_trains_and_resumes_mid_epoch_bit_identical(image_root, tmp_path_factory):
    reference, record = tmp_path_factory.mktemp("repeats_reference"), tmp_path_factory.mktemp("repeats_record")
    done = run_train(tiny_args(image_root, reference, *REPEATS),
                     env=script_env(RESNEST_TRAIN_SAMPLE_LOG=str(record)))
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [json.loads(line) for line in (record / "rank0.jsonl").read_text().splitlines()]
    for epoch in (0, 1):  # 48 images, 6 steps of 8: the epoch's first 16 images, 3 copies each
        copies = [(s, d["repeat"]) for r in rows if r["epoch"] == epoch for s, d in zip(r["samples"], r["draws"])]
        assert len(copies) == 48 and len(set(copies)) == 48 and set(Counter(s for s, _ in copies).values()) == {3}

    out = tmp_path_factory.mktemp("repeats_resumed")
    args = tiny_args(image_root, out, *REPEATS, "checkpoint.interval_steps=1")
    kill_after_step_2_and_resume(args, out)
    assert_bit_identical(final_weights(out), final_weights(reference))
