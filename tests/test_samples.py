"""`SampleList` (data/samples.py): reads like the list of (path, label) pairs it replaces, and travels
between ranks as one compressed buffer that gives back the same list."""

from __future__ import annotations

import numpy as np

from resnest_train.data.index import index_from_bytes, index_to_bytes, load_index
from resnest_train.data.samples import SampleList
from resnest_train.data.undecodable import add_to_record, known_positions, read_record

PAIRS = [(0, "x.jpg", 0), (1, "yy.jpg", 1), (0, "z.jpg", 0), (1, "é.jpg", 1)]


def samples() -> SampleList:
    return SampleList.from_pairs("folder", ["train/a", "train/b"], PAIRS)


def test_reads_like_a_list_of_pairs():
    expected = [("train/a/x.jpg", 0), ("train/b/yy.jpg", 1), ("train/a/z.jpg", 0), ("train/b/é.jpg", 1)]
    s = samples()
    assert list(s) == expected and [s[i] for i in range(len(s))] == expected and s[-1] == expected[-1]
    assert list(s[1::2]) == expected[1::2] and list(s.take([3, 0])) == [expected[3], expected[0]]
    assert s.index(("train/a/z.jpg", 0)) == 2 and s + [] == expected


def test_shard_members_are_named_shard_and_member():
    s = SampleList.from_pairs("shards", ["train/t-0.tar"], [(0, "k/a.jpg", 3)], starts=np.array([512]),
                              sizes=np.array([100]))
    assert s[0] == ("train/t-0.tar:k/a.jpg", 3) and s.take([0]).starts.tolist() == [512]


def test_the_buffer_ranks_receive_gives_back_the_index(image_root):
    index = load_index(image_root)
    received = index_from_bytes(index_to_bytes(index))
    assert received.classes == index.classes and received.skipped == index.skipped
    assert list(received.train) == list(index.train) and list(received.val) == list(index.val)
    assert received.train.labels.dtype == np.int32 and received.layout == "folder"


def test_member_names_holding_the_joiner_round_trip_through_the_record(tmp_path):
    """A shard member named `a:b.jpg` (or a folder file `x/y` nested in its class): `position(path(i))` is
    i, also through undecodable.txt, so a recorded image is recognised at every restart."""
    s = SampleList.from_pairs("shards", ["train/t:0.tar", "train/t-1.tar"],
                              [(0, "k/a:b.jpg", 0), (1, "c:d:e.jpg", 1), (1, "e.jpg", 1)],
                              starts=np.array([512, 512, 2048]), sizes=np.array([10, 10, 10]))
    assert [s.position(s.path(i)) for i in range(3)] == [0, 1, 2]
    add_to_record(tmp_path, [s.path(1), s.path(0)])
    assert known_positions(s, read_record(tmp_path)) == [0, 1]
    folder = SampleList.from_pairs("folder", ["train/a", "train/a/b"], [(0, "b:1.jpg", 0), (1, "x.jpg", 0)])
    assert [folder.position(folder.path(i)) for i in range(2)] == [0, 1]
    assert s.position("train/t-2.tar:e.jpg") is None and s.position("nothing") is None
