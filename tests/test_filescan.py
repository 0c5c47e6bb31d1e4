"""The shard scan (filescan.py) on shards that are not whole or not well formed: each is named with what it
costs, never dropped silently and never a traceback."""

from __future__ import annotations

import io
import os
import re
import tarfile
from pathlib import Path

import pytest

from resnest_train.data.index import DatasetError, load_index


def write_tar(path: Path, members: list[tuple[str, bytes]], tar_format=tarfile.USTAR_FORMAT) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tar_format) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def samples(jpeg: bytes, keys, label: int = 0) -> list[tuple[str, bytes]]:
    return [member for key in keys for member in ((f"{key}.jpg", jpeg), (f"{key}.cls", f"{label}\n".encode()))]


@pytest.fixture()
def jpeg(image_root) -> bytes:
    return sorted((image_root / "train").rglob("*.jpg"))[0].read_bytes()


@pytest.fixture()
def root(tmp_path, jpeg) -> Path:
    """train/ with two good shards of 4 and 16 samples, val/ with one."""
    write_tar(tmp_path / "train" / "a.tar", samples(jpeg, [f"a{i}" for i in range(4)]))
    write_tar(tmp_path / "train" / "b.tar", samples(jpeg, [f"b{i:02d}" for i in range(16)]))
    write_tar(tmp_path / "val" / "v.tar", samples(jpeg, ["v0", "v1"]))
    return tmp_path


def offset_of(path: Path, name: str) -> int:
    with tarfile.open(path) as tar:
        return tar.getmember(name).offset_data


@pytest.mark.parametrize("tar_format", [tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT], ids=["ustar", "pax"])
def test_a_shard_cut_inside_a_member_is_named_with_what_it_keeps(root, tar_format, jpeg):
    shard = root / "train" / "b.tar"
    write_tar(shard, samples(jpeg, [f"b{i:02d}" for i in range(16)]), tar_format)
    os.truncate(shard, offset_of(shard, "b02.jpg") + 100)
    index = load_index(root, write_cache=False)
    assert len(index.train) == 4 + 2
    [(path, reason)] = index.skipped
    assert path == str(shard) and "cut short" in reason and "inside member b02.jpg" in reason
    assert "2 samples before it are used" in reason


def test_a_shard_cut_at_a_block_boundary_or_empty_is_named(root):
    shard = root / "train" / "b.tar"
    os.truncate(shard, offset_of(shard, "b03.jpg") - 512)  # before b03's header: b00-b02 whole
    (root / "train" / "c.tar").write_bytes(b"")
    index = load_index(root, write_cache=False)
    assert len(index.train) == 4 + 3
    assert dict(index.skipped) == {
        str(shard): "shard cut short (an interrupted copy?): the samples after its end are missing (no end-of-archive "
                    "blocks); 3 samples before it are used",
        str(root / "train" / "c.tar"): "empty shard (0 bytes); 0 samples before it are used"}


def test_a_file_that_is_not_a_tar_is_named(root):
    (root / "train" / "c.tar").write_bytes(b"<html>not found</html>" * 40)
    index = load_index(root, write_cache=False)
    [(path, reason)] = index.skipped
    assert path == str(root / "train" / "c.tar") and reason.startswith("not a tar archive")


@pytest.mark.parametrize("members,named", [
    (lambda jpeg: samples(jpeg, ["k"]) + [("k.png", jpeg)], "two images for the sample key 'k' (k.jpg and k.png)"),
    (lambda jpeg: samples(jpeg, ["k", "m", "k"]), "two images for the sample key 'k' (k.jpg and k.jpg)"),
    (lambda jpeg: [("k.jpg", jpeg), ("k.cls", b"0"), ("k.cls", b"1")], "the sample key 'k' has two .cls members"),
], ids=["two-images", "repeated-key", "two-labels"])
def test_a_key_used_twice_in_a_shard_is_one_error_naming_it(root, jpeg, members, named):
    write_tar(root / "train" / "c.tar", members(jpeg))
    with pytest.raises(DatasetError, match=f"^{re.escape(str(root / 'train' / 'c.tar'))}: {re.escape(named)}"):
        load_index(root, write_cache=False)


def test_a_class_index_beyond_int64_is_named(root, jpeg):
    write_tar(root / "train" / "c.tar", [("k.jpg", jpeg), ("k.cls", str(2**64).encode())])
    index = load_index(root, write_cache=False)
    assert index.skipped == [(f"{root / 'train' / 'c.tar'}:k.jpg",
                              f"class index {2**64} in its .cls member is too large")]


def test_names_that_are_not_utf8_name_their_shard_or_folder(root, jpeg, image_root, tmp_path):
    with open(root / "train" / "c.tar", "wb") as out:  # tarfile will not write such a name: patch it in
        buffer = io.BytesIO()
        write_tar(tmp_path / "x.tar", samples(jpeg, ["kk"]))
        buffer.write((tmp_path / "x.tar").read_bytes())
        data = bytearray(buffer.getvalue())
        data[0:2] = b"\xff\xfe"
        data[148:156] = f"{sum(data[:148]) + 256 + sum(data[156:512]):06o}\0 ".encode()
        out.write(bytes(data))
    with pytest.raises(DatasetError, match=r"c\.tar: member name b'\\xff\\xfe\.jpg' is not UTF-8"):
        load_index(root, write_cache=False)
    folder = tmp_path / "folder"
    for split in ("train", "val"):
        (folder / split / "cat").mkdir(parents=True)
        (folder / split / "cat" / "a.jpg").write_bytes(jpeg)
    (folder / "train" / "cat").joinpath(os.fsdecode(b"\xff.jpg")).write_bytes(jpeg)
    with pytest.raises(DatasetError, match=r"train/cat: file name b'\\xff\.jpg' is not UTF-8"):
        load_index(folder, write_cache=False)
