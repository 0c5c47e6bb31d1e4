"""The node-local shard cache (data/shard_cache.py): within its limit at every moment, Belady's eviction
against LRU on the same order, one download per node, interrupted and corrupt copies never read, a shard
changed in the store refused, prefetch ahead of the reader. The store is a local folder here
(`FakeStore`); tests/test_store_training.py runs the cache against real servers."""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import shutil
import time

import numpy as np
import pytest

from resnest_train.data import shard_caches, store
from resnest_train.data.cache_locks import locked
from resnest_train.data.next_use import NextUse
from resnest_train.data.shard_cache import ShardCache
from resnest_train.data.shard_caches import open_cache

ROOT = "s3://bucket/data"


class FakeStore:
    """Shards of given sizes in a folder, served as `ROOT`; counts what is downloaded."""

    def __init__(self, folder, sizes: dict[str, int], monkeypatch):
        self.folder, self.downloads = folder, []
        for unit, size in sizes.items():
            (folder / unit).parent.mkdir(parents=True, exist_ok=True)
            (folder / unit).write_bytes(bytes([len(self.downloads) % 256]) * size)
        monkeypatch.setattr(store, "info", self.info)
        monkeypatch.setattr(store, "download", self.download)

    def local(self, url: str):
        return self.folder / url.removeprefix(ROOT + "/")

    def info(self, url: str) -> dict:
        stat = self.local(url).stat()
        return {"ETag": f"{stat.st_mtime_ns}", "size": stat.st_size}

    def download(self, url: str, destination: str) -> None:
        self.downloads.append(url.removeprefix(ROOT + "/"))
        with open(self.local(url), "rb") as source, open(destination, "r+b") as target:
            shutil.copyfileobj(source, target)

    def stamps(self) -> dict:
        return {str(p.relative_to(self.folder)): store.stamp_of(self.info(f"{ROOT}/{p.relative_to(self.folder)}"))
                for p in self.folder.rglob("*.tar")}


def units(n: int) -> dict[str, int]:
    return {f"train/s{i:02d}.tar": 1000 for i in range(n)}


def replay(cache: ShardCache, sequence: list[str]) -> int:
    """Read each shard of `sequence` at its step (its index), planned in advance; the most the cache held."""
    ids = np.array([cache.future.ids[unit] for unit in sequence])
    cache.future.plan([(0, ids)], len(sequence), 1)
    most = 0
    for step, unit in enumerate(sequence):
        cache.now = step
        assert cache.read(unit, 0, 10) == (cache.path(unit).read_bytes()[:10])
        most = max(most, cache.usage())
    return most


def test_belady_evicts_the_farthest_next_use_and_beats_lru_within_the_limit(tmp_path, monkeypatch):
    fake = FakeStore(tmp_path / "store", units(5), monkeypatch)
    sequence = [f"train/s{i % 5:02d}.tar" for i in range(40)]  # a cycle one shard larger than the cache
    counts = {}
    for policy in ("belady", "lru"):
        fake.downloads.clear()
        cache = ShardCache(ROOT, tmp_path / policy, fake.stamps(), limit=4000, policy=policy)
        assert replay(cache, sequence) <= 4000 and cache.node_stats()["peak"] <= 4000
        counts[policy] = len(fake.downloads)
    assert counts == {"belady": optimal_misses(sequence, 4), "lru": 40}  # LRU evicts what comes back next


def optimal_misses(sequence: list[str], capacity: int) -> int:
    """Belady's MIN, written plainly: on a miss with a full cache, drop the item used again farthest away."""
    held, misses = set(), 0
    for i, item in enumerate(sequence):
        if item in held:
            continue
        misses += 1
        if len(held) == capacity:
            later = sequence[i + 1:]
            held.remove(max(held, key=lambda x: later.index(x) if x in later else len(later)))
        held.add(item)
    return misses


def test_next_use_of_training_and_validation_shards():
    future = NextUse(["train/a.tar", "train/b.tar", "val/v.tar"])
    future.plan([(3, np.array([0, 0, 1, 0])), (10, np.array([1, 1]))], steps_per_epoch=10, global_batch=2)
    assert [future.next("train/a.tar", t) for t in (0, 4, 5)] == [3, 4.5, float("inf")]  # image 2 of step 4
    assert [future.next("train/b.tar", t) for t in (0, 5)] == [4, 10]
    assert future.next("val/v.tar", 4) == 10 and future.next("val/v.tar", 10) == 20  # the epoch's end
    assert future.coming(4, 2) == ["train/b.tar", "train/a.tar"]  # b at 4.0, a at 4.5


def test_a_corrupt_or_interrupted_copy_is_never_read(tmp_path, monkeypatch):
    fake = FakeStore(tmp_path / "store", units(2), monkeypatch)
    cache = ShardCache(ROOT, tmp_path / "cache", fake.stamps())
    cache.read("train/s00.tar", 0, 1)
    cache.path("train/s00.tar").write_bytes(b"short")  # a copy cut short (or altered in size)
    dead = cache.path("train/s01.tar").with_name(".s01.tar.999999999.1.part")
    dead.write_bytes(b"partial")  # a download of a process that died
    cache = ShardCache(ROOT, tmp_path / "cache", fake.stamps())
    assert not dead.exists()
    assert cache.read("train/s00.tar", 0, 4) == bytes(4) and fake.downloads == ["train/s00.tar"] * 2

    def broken(url, destination):
        raise store.StoreError(f"cannot read {url}: unreachable")
    monkeypatch.setattr(store, "download", broken)
    with pytest.raises(store.StoreError, match="unreachable"):
        cache.read("train/s01.tar", 0, 1)
    assert sorted(p.name for p in (tmp_path / "cache" / "train").iterdir()) == ["s00.tar"]  # no .part left


def test_a_shard_changed_in_the_store_is_refused(tmp_path, monkeypatch):
    fake = FakeStore(tmp_path / "store", units(1), monkeypatch)
    cache = ShardCache(ROOT, tmp_path / "cache", fake.stamps())
    os.utime(tmp_path / "store" / "train" / "s00.tar", ns=(1, 1))
    with pytest.raises(store.StoreError, match="s00.tar changed since the dataset was indexed .* rerun"):
        cache.read("train/s00.tar", 0, 1)


def _read_in_child(folder, stamps, queue) -> None:
    cache = ShardCache(ROOT, folder, stamps)
    queue.put(cache.read("train/s00.tar", 0, 3))


def test_one_download_per_node_for_processes_reading_the_same_shard(tmp_path, monkeypatch):
    fake = FakeStore(tmp_path / "store", units(1), monkeypatch)
    slow = fake.download
    monkeypatch.setattr(store, "download", lambda url, dest: (time.sleep(0.5), slow(url, dest)))
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    children = [context.Process(target=_read_in_child, args=(tmp_path / "cache", fake.stamps(), queue))
                for _ in range(3)]
    for child in children:
        child.start()
    results = [queue.get(timeout=30) for _ in children]
    for child in children:
        child.join(10)
    assert results == [bytes(3)] * 3
    assert ShardCache(ROOT, tmp_path / "cache", fake.stamps()).node_stats()["downloaded"] == 1000


def test_a_limit_below_the_largest_shard_is_refused(tmp_path, monkeypatch):
    fake = FakeStore(tmp_path / "store", units(2), monkeypatch)
    monkeypatch.setattr(shard_caches, "CACHES", {})
    with pytest.raises(store.StoreError, match=r"data.cache_limit=999 bytes is below the largest shard, "
                                               r"s3://bucket/data/train/s0\d.tar \(1000 bytes\)"):
        open_cache(ROOT, str(tmp_path / "cache"), fake.stamps(), 999, 0)


def test_prefetch_fetches_the_coming_shards_ahead_of_the_reader(tmp_path, monkeypatch):
    fake = FakeStore(tmp_path / "store", units(6), monkeypatch)
    cache = ShardCache(ROOT, tmp_path / "cache", fake.stamps(), limit=3000, prefetch=2)
    cache.future.plan([(0, np.arange(6))], 6, 1)
    cache.advance(0)
    deadline = time.monotonic() + 10
    while len(fake.downloads) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
        cache.advance(0)
    time.sleep(0.2)
    assert sorted(fake.downloads) == ["train/s00.tar", "train/s01.tar", "train/s02.tar"]  # what fits, soonest
    assert cache.usage() <= 3000


def test_a_child_forked_while_a_lock_is_held_does_not_keep_it(tmp_path):
    """A DataLoader worker forked while a prefetch thread held a shard's lock: the lock is the parent's,
    released when the parent releases it (the child's inherited copy of the descriptor is closed)."""
    context = multiprocessing.get_context("fork")
    with locked(tmp_path / "shard.lock"):
        child = context.Process(target=time.sleep, args=(20,))
        child.start()
    fd = os.open(tmp_path / "shard.lock", os.O_RDWR)
    deadline = time.monotonic() + 3  # the child closes its copy as it starts (the time it takes to be scheduled)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:  # the child holds a copy of the parent's locked descriptor
                assert time.monotonic() < deadline, "the forked child keeps the parent's lock"
                time.sleep(0.05)
    finally:
        os.close(fd)
        child.terminate()
        child.join()
