"""A remote data root (data/store.py, data/store_index.py): shards listed, named by a brace pattern or by
`_info.json`, indexed by byte ranges as the same shards on disk are, revalidated by their stamps; each store
failure one line naming the object, retried only where it may pass."""

from __future__ import annotations

import io
import json
import os
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

from resnest_train.data import store
from resnest_train.data.index import load_index
from tests.conftest import free_port
from tests.servers import http_store, s3_store, upload
from tests.test_shards import pack


@pytest.fixture(scope="module")
def shards(image_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("store-shards")
    assert pack(image_root, out, "--shard-size", "20000").returncode == 0
    return out


@pytest.fixture(autouse=True)
def own_home(tmp_path, monkeypatch):
    """The remote index cache lives in ~/.cache: each test its own."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(store, "RETRY_DELAYS", (0.05, 0.1))


def same_index(a, b) -> None:
    assert a.classes == b.classes and a.layout == b.layout == "shards"
    for split in ("train", "val"):
        x, y = getattr(a, split), getattr(b, split)
        assert x.dirs == y.dirs and list(x) == list(y)
        assert np.array_equal(x.starts, y.starts) and np.array_equal(x.sizes, y.sizes)


def test_an_http_root_is_indexed_as_the_same_shards_on_disk(shards, tmp_path):
    with http_store(shards, tmp_path / "server") as server:
        same_index(load_index(server.url + "/"), load_index(shards))


def test_an_s3_root_is_indexed_as_the_same_shards_on_disk(shards, monkeypatch):
    import s3fs
    with s3_store() as env:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        s3fs.S3FileSystem.clear_instance_cache()
        store.filesystem.cache_clear()
        root = upload(env, shards, "bucket-a/imagenet")
        index = load_index(root)
        same_index(index, load_index(shards))
        assert index.root == root and index.stamps["train/train-000000.tar"][1] > 0


def big_shard(folder, images: int = 4) -> None:
    """One shard of photo-sized JPEGs (noise: about 150 KB each)."""
    (folder / "train").mkdir(parents=True)
    (folder / "val").mkdir()
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        with tarfile.open(folder / split / f"{split}-0.tar", "w") as tar:
            for i in range(images):
                buffer = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (300, 300, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=95)
                for name, data in ((f"s{i}.jpg", buffer.getvalue()), (f"s{i}.cls", str(i % 2).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def test_the_index_reads_tar_headers_not_whole_shards(tmp_path):
    big_shard(tmp_path / "data")
    size = (tmp_path / "data" / "train" / "train-0.tar").stat().st_size
    with http_store(tmp_path / "data", tmp_path / "server") as server:
        index = load_index(server.url)
        assert len(index.train) == 4 and index.skipped == []
        assert server.sent("train-0.tar") < 0.1 * size  # about one 4 KB range per member


def test_a_warm_index_reads_no_shard_and_a_changed_shard_is_indexed_again(shards, tmp_path):
    with http_store(shards, tmp_path / "server") as server:
        load_index(server.url)
        cold = server.sent()
        load_index(server.url)
        assert server.sent() == cold  # stamps (ETags) compared, nothing read
        shard = shards / "train" / "train-000001.tar"
        os.utime(shard, ns=(time.time_ns(), time.time_ns()))  # a new ETag, the same bytes
        others = server.sent() - server.sent("train-000001")
        before = server.sent("train-000001")
        load_index(server.url)
        assert server.sent("train-000001") > before and server.sent() - server.sent("train-000001") == others


def test_shards_named_by_a_brace_pattern_or_by_info_json_where_nothing_lists(shards, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for path in shards.rglob("*.tar"):
        (data / path.parent.name).mkdir(exist_ok=True)
        os.link(path, data / path.parent.name / path.name)
    with http_store(data, tmp_path / "server", "--no-listing") as server:
        with pytest.raises(store.UserError, match=r"no shards \(\*.tar\) found in .*/train \(a remote data.root "
                                                  r"holds shards; .*data.train_shards"):
            load_index(server.url)
        patterns = {"train": "train-{000000..000006}.tar", "val": "val-{000000..000002}.tar"}
        by_pattern = load_index(server.url, patterns=patterns)
        names = {split: sorted(p.name for p in (data / split).glob("*.tar")) for split in ("train", "val")}
        (data / "_info.json").write_text(json.dumps({"splits": {"train": {"filenames": names["train"]},
                                                                "validation": {"filenames": names["val"]}}}))
        by_info = load_index(server.url)
    same_index(by_pattern, by_info)
    assert len(by_info.train) == 48 and by_info.classes == [str(i) for i in range(4)]  # no classes.txt


def failing(server, status: int, count: int, **rule) -> str:
    server.inject(status, count, **rule)
    with pytest.raises(store.StoreError) as caught:
        load_index(server.url)
    return str(caught.value)


def test_store_failures_are_one_line_and_retried_only_where_they_may_pass(shards, tmp_path):
    with http_store(shards, tmp_path / "server") as server:
        message = failing(server, 403, 100, match="train-000003")
        # one call, not retried (fsspec's info asks HEAD, then GET, itself)
        asked = 100 - server.remaining()
        assert "train-000003.tar: access denied (HTTP 403)" in message and asked <= 2
        server.inject(403, 0)
        assert "no such object" in str(pytest.raises(store.StoreError, load_index, server.url,
                                                     patterns={"train": "train-{000000..000009}.tar"}).value)
        message = failing(server, 503, 100, match="train-000003")
        assert "HTTP 503 (throttled or unavailable); tried 3 times" in message and 100 - server.remaining() == 3 * asked
        server.inject(503, 2, match="train-000003")  # throttled twice, then served
        assert len(load_index(server.url).train) == 48 and server.remaining() == 0
    started = time.monotonic()
    with pytest.raises(store.StoreError, match=r"cannot read http://127.0.0.1:\d+/train: unreachable"):
        load_index(f"http://127.0.0.1:{free_port()}/")
    assert time.monotonic() - started < 10
    assert "\n" not in message


def test_a_store_whose_package_is_missing_is_one_line(monkeypatch):
    import fsspec

    def missing(protocol, **options):
        raise ImportError(f"Install gcsfs to access {protocol}")
    monkeypatch.setattr(fsspec, "filesystem", missing)
    store.filesystem.cache_clear()
    try:
        with pytest.raises(store.StoreError, match=r"reading gs:// needs the package gcsfs: pip install gcsfs"):
            store.fs_of("gs://bucket/imagenet")
    finally:
        store.filesystem.cache_clear()
