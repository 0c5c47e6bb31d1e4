"""The data order's `data.shuffle=shards` (data/order.py): shards permuted from (seed, epoch), images shuffled
within windows of `data.shuffle_window` shards, every image once per epoch, dealt as the global order is (the
same micro-batches on any process count, from any step, with repeated augmentation); a folder dataset is
refused; `global` is the permutation it always was."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from resnest_train.config import ConfigError
from resnest_train.data.order import shard_groups
from resnest_train.data.reader import EpochCursor
from resnest_train.recipe.randomness import epoch_permutation, shard_permutation
from tests.conftest import make_order, run_script, train_args
from tests.test_faults import one_line_error

# 48 images in 12 shards of uneven sizes, packed shard after shard as pack_dataset.py lists them
SIZES = [5, 3, 4, 6, 2, 4, 4, 5, 3, 4, 4, 4]
GROUPS = torch.repeat_interleave(torch.arange(len(SIZES)), torch.tensor(SIZES))
EVEN = torch.arange(48) // 4  # 12 shards of 4


def shards_order(window: int = 3, groups: torch.Tensor = GROUPS, **kwargs):
    return make_order(48, 4, global_batch=16, groups=groups, window=window, **kwargs)


@pytest.mark.parametrize("window", [1, 3, 5, 12, 20])
def test_every_image_once_per_epoch(window):
    for epoch in range(3):
        assert sorted(shards_order(window).epoch_order(epoch).tolist()) == list(range(48))


@pytest.mark.parametrize("window", [1, 3, 5])
def test_window_j_holds_the_images_of_the_jth_group_of_permuted_shards(window):
    """Independently of order.py's sort: the epoch's shard permutation cut into groups of `window`, and the
    epoch's list as those groups' images, group after group, each group's in a shuffled order."""
    order, epoch = shards_order(window), 4
    listed = order.epoch_order(epoch)
    permuted = shard_permutation(0, epoch, len(SIZES)).tolist()
    start, interleaved = 0, False
    for j in range(0, len(SIZES), window):
        group = permuted[j:j + window]
        members = [i for i in range(48) if GROUPS[i].item() in group]
        held = listed[start:start + len(members)].tolist()
        assert sorted(held) == members, (j, group)
        interleaved |= len(group) > 1 and held != sorted(held, key=lambda i: group.index(GROUPS[i].item()))
        start += len(members)
    assert start == 48 and (interleaved or window == 1)  # a window's images mixed across its shards


def test_each_run_of_window_times_shard_size_draws_from_window_shards():
    window = 3
    for epoch in range(3):
        listed = shards_order(window, EVEN).epoch_order(epoch)
        for start in range(0, 48, window * 4):
            shards = set(EVEN[listed[start:start + window * 4]].tolist())
            assert len(shards) == window, (epoch, start, shards)


def test_each_epoch_deals_the_shards_anew_and_the_same_key_the_same_order():
    order = shards_order()
    first_shards = [GROUPS[order.epoch_order(epoch)[0]].item() for epoch in range(8)]
    windows = {tuple(sorted(set(GROUPS[order.epoch_order(epoch)[:12]].tolist()))) for epoch in range(8)}
    assert len(windows) > 4 and len(set(first_shards)) > 2  # not one shard order for every epoch
    assert not torch.equal(order.epoch_order(1), order.epoch_order(2))
    assert torch.equal(order.epoch_order(3), shards_order().epoch_order(3))  # (seed, epoch) alone
    assert not torch.equal(order.epoch_order(3), shards_order(seed=1).epoch_order(3))


def test_windows_as_large_as_the_list_are_the_global_order():
    """Within a window the images keep the global permutation's order: one window of every shard gives it
    back (and the shards' own permutation draws from a stream of its own)."""
    assert torch.equal(shards_order(12).epoch_order(2), epoch_permutation(0, 2, 48))
    assert torch.equal(shards_order(30).epoch_order(2), make_order(48, 4, global_batch=16).epoch_order(2))
    assert not torch.equal(shards_order(3).epoch_order(2), epoch_permutation(0, 2, 48))


def test_an_epoch_kept_by_an_earlier_seed_keeps_its_shard_order():
    kept = shards_order(earlier_seed=(2, 5))
    assert torch.equal(kept.epoch_order(2), shards_order(seed=5).epoch_order(2))
    assert torch.equal(kept.epoch_order(3), shards_order().epoch_order(3))


def global_micro_batches(world_size: int, start_step: int = 0, repeats: int = 1) -> dict:
    """(step, micro-batch) -> samples of epoch 2 with shard windows, read by every rank of `world_size` from
    `start_step` (48 images, global batch 16, micro-batches of 4)."""
    out = {}
    for rank in range(world_size):
        order = make_order(48, 4, world_size=world_size, rank=rank, global_batch=16, repeats=repeats,
                           groups=GROUPS, window=3)
        reader = EpochCursor(order, start=(2, start_step))
        for row, samples in enumerate(reader.set_epoch(2)):
            step, micro_step = divmod(row, order.layout.accumulation)
            out[start_step + step, order.micro_batch_index(micro_step)] = tuple(samples.tolist())
    return out


@pytest.mark.parametrize("repeats", [1, 3])
def test_process_counts_read_the_same_micro_batches_of_every_step(repeats):
    one = global_micro_batches(1, repeats=repeats)
    assert one == global_micro_batches(2, repeats=repeats) == global_micro_batches(4, repeats=repeats)
    assert len(one) == 3 * 4
    listed = shards_order(repeats=repeats).epoch_order(2)
    assert Counter(s for samples in one.values() for s in samples) == Counter(listed.tolist())
    if repeats == 1:  # micro-batch m of step k: positions [16k + 4m, 16k + 4m + 4) of the windowed list
        assert all(samples == tuple(listed[16 * k + 4 * m:16 * k + 4 * m + 4].tolist())
                   for (k, m), samples in one.items())
    # the rest of the epoch from step 1 on another process count: the same micro-batches, each image once
    rest = {key: value for key, value in one.items() if key[0] >= 1}
    assert global_micro_batches(2, 1, repeats) == global_micro_batches(4, 1, repeats) == rest


def test_repeated_augmentation_repeats_the_windowed_list():
    windowed = shards_order().epoch_order(1)
    repeated = shards_order(repeats=3).epoch_order(1)
    assert torch.equal(repeated, windowed.repeat_interleave(3)[:48])  # timm's repeat_interleave, cut to N
    assert list(Counter(repeated.tolist())) == windowed[:16].tolist()


def test_shard_groups_come_from_a_shard_index_and_a_folder_is_refused():
    assert shard_groups("global", None, "data") is None
    shards = SimpleNamespace(layout="shards", train=SimpleNamespace(dir_ids=np.array([0, 0, 1], dtype=np.int32)))
    assert shard_groups("shards", shards, "data").tolist() == [0, 0, 1]
    with pytest.raises(ConfigError, match=r"data.shuffle=shards needs a shard dataset \(train/\*\.tar\), but "
                                          r"/d holds class folders"):
        shard_groups("shards", SimpleNamespace(layout="folder"), "/d")


def test_the_order_says_how_it_deals():
    assert make_order(48, 4).shuffle == {"shuffle": "global"}
    assert shards_order(5).shuffle == {"shuffle": "shards", "window": 5} and shards_order().num_shards == 12


@pytest.mark.slow
def test_shards_on_a_folder_dataset_is_one_error_line_at_start(image_root, tmp_path):
    result = run_script(train_args(image_root, tmp_path, "data.backend=torchvision", "data.shuffle=shards"), expect=2)
    one_line_error(result, "data.shuffle=shards needs a shard dataset (train/*.tar)", f"{image_root} holds class "
                   "folders", "pack_dataset.py --shuffle SEED")
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())
