"""labels.py: ImageNet-ReaL labels looked up by file name, in folders and in shards alike; class lists."""

from __future__ import annotations

import json
import re

import pytest
import torch

from resnest_train.errors import UserError
from resnest_train.labels import RealLabels, class_index_names, read_class_list


class Listing:
    """The part of a SampleList RealLabels reads: len() and path(i)."""

    def __init__(self, paths: list[str]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, i: int) -> str:
        return self.paths[i]


def test_real_labels_follow_the_file_names_in_folders_and_in_shards(tmp_path):
    """Shard members are `shard.tar:name`: sorted by that whole string, a later shard holding an earlier file
    paired ReaL rows with the wrong images."""
    (tmp_path / "real.json").write_text(json.dumps([[0], [1], []]))  # val_1 -> {0}, val_2 -> {1}, val_3 unjudged
    folders = Listing(["b/ILSVRC2012_val_00000002.JPEG", "a/ILSVRC2012_val_00000001.JPEG",
                       "a/ILSVRC2012_val_00000003.JPEG"])
    shards = Listing(["a-0001.tar:ILSVRC2012_val_00000002.JPEG", "b-0002.tar:ILSVRC2012_val_00000001.JPEG",
                      "b-0002.tar:ILSVRC2012_val_00000003.JPEG"])
    for listing in (folders, shards):
        real = RealLabels(str(tmp_path / "real.json"), listing, 10)
        counts = real.counts(listing.paths, [[1, 0], [0, 2], [5, 6]], torch.device("cpu"))
        assert counts.tolist() == [2.0, 2.0, 2.0]  # both judged images right at 1; the empty list not counted


def test_a_real_file_for_another_set_is_one_error(tmp_path):
    (tmp_path / "real.json").write_text(json.dumps([[0]]))
    with pytest.raises(UserError, match="labels 1 images; the validation list has 2"):
        RealLabels(str(tmp_path / "real.json"), Listing(["a/x.JPEG", "a/y.JPEG"]), 10)


@pytest.mark.parametrize("rows,needle", [
    ([[0], ["a"], [1]], 'entry 2 (["a"], image val_2.JPEG) is not a list of class indices in 0..9'),
    ([[0], [1], [10]], "entry 3 ([10], image val_3.JPEG) is not a list of class indices in 0..9"),
    ([[-1], [1], [2]], "entry 1 ([-1], image val_1.JPEG) is not a list"),
    ([[0], [True], [2]], "entry 2 ([true], image val_2.JPEG) is not a list"),
    ([[0], [1.0], [2]], "entry 2 ([1.0], image val_2.JPEG) is not a list"),
    ([[0], 3, [2]], "entry 2 (3, image val_2.JPEG) is not a list"),
    ([[], [], []], "every entry is an empty list, so no image has a ReaL label"),
])
def test_real_labels_that_could_never_match_a_prediction_are_one_error(tmp_path, rows, needle):
    """Strings, indices outside the model's classes or only empty lists scored ReaL-1 0.00 with no word."""
    (tmp_path / "real.json").write_text(json.dumps(rows))
    with pytest.raises(UserError, match=re.escape(f"--real-labels {tmp_path / 'real.json'}: {needle}")):
        RealLabels(str(tmp_path / "real.json"), Listing([f"a/val_{i}.JPEG" for i in (3, 1, 2)]), 10)


def test_class_lists(tmp_path):
    assert class_index_names(3) == ["0", "1", "2"]
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    assert read_class_list(str(tmp_path / "classes.txt"), 2) == ["cat", "dog"]
    with pytest.raises(UserError, match="names 2 classes"):
        read_class_list(str(tmp_path / "classes.txt"), 3)


def test_file_names_of_shard_members_that_hold_a_colon():
    from resnest_train.labels import _file_name
    assert _file_name("val/v-0.tar:n01/a:b.JPEG") == "a:b.JPEG" and _file_name("val/v-0.tar:c.JPEG") == "c.JPEG"
    assert _file_name("val/n01/d.JPEG") == "d.JPEG"
