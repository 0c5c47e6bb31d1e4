"""This process's shard caches, one per remote data root (shard_cache.py): opened once the index is known,
told the training order and each step reached, and asked at each epoch's end what they fetched. The
loaders, the cursor and the epoch's end reach the cache through these functions, never through a global of
their own.
"""

from __future__ import annotations

import hashlib
import logging
from contextlib import contextmanager
from pathlib import Path

from resnest_train.data import store
from resnest_train.data.shard_cache import ShardCache
from resnest_train.errors import size_text

log = logging.getLogger(__name__)

CACHES: dict[str, ShardCache] = {}


def cache_folder(root: str, cache_dir: str | None) -> Path:
    """`<cache_dir>/<the root's last name>-<digest of the root>`: two roots never share a folder."""
    base = Path(cache_dir).expanduser() if cache_dir else Path.home() / ".cache" / "resnest_train" / "shards"
    name = root.rstrip("/").rsplit("/", 1)[-1] or "root"
    return base / f"{name}-{hashlib.sha1(root.encode()).hexdigest()[:10]}"


def open_cache(root: str, cache_dir: str | None, stamps: dict[str, tuple[int, int]], limit: int | None,
               prefetch: int) -> ShardCache:
    """This process's cache of `root` (kept for the process: its loaders and evaluation read through it)."""
    largest = max((size for _, size in stamps.values()), default=0)
    if limit is not None and limit < largest:
        unit = max(stamps, key=lambda u: stamps[u][1])
        raise store.StoreError(f"data.cache_limit={limit} bytes is below the largest shard, "
                               f"{store.join(root, unit)} ({largest} bytes): the cache could never hold it")
    store.fs_of(root)  # fsspec and its back end imported here, on the main thread, before any thread forks
    cache = CACHES.get(root)
    if cache is None or cache.stamps != stamps or cache.limit != limit:
        try:
            cache = ShardCache(root, cache_folder(root, cache_dir), stamps, limit, prefetch)
        except OSError as exc:
            raise store.StoreError(f"cannot use the shard cache {cache_folder(root, cache_dir)} "
                                   f"(data.cache_dir): {exc.strerror or exc}") from None
        CACHES[root] = cache
    return cache


def cache_of(root: str) -> ShardCache:
    cache = CACHES.get(root)
    if cache is None:
        raise store.StoreError(f"{root}: no shard cache is open for this root")
    return cache


def follow_order(root: str, samples, order) -> None:
    cache_of(root).follow(samples, order)


@contextmanager
def evaluation():
    """An evaluation reads the validation shards now: they are fetched ahead and kept meanwhile."""
    for cache in CACHES.values():
        cache.evaluating = True
    try:
        yield
    finally:
        for cache in CACHES.values():
            cache.evaluating = False


def epoch_started(epoch: int, start_step: int) -> None:
    """A training reader starts `epoch` at `start_step` (reader.EpochCursor): every cache plans ahead."""
    for cache in CACHES.values():
        cache.set_epoch(epoch, start_step)


def step_reached(epoch: int, step: int) -> None:
    for cache in CACHES.values():
        if cache.order is not None:
            cache.advance(epoch * cache.order.steps_per_epoch + step)


def epoch_report() -> str | None:
    """One line on the caches' traffic since the last report (the run's log, each epoch's end)."""
    lines = []
    for cache in CACHES.values():
        totals = cache.node_stats()
        since = totals["downloaded"] - cache.reported
        cache.reported = totals["downloaded"]
        data = sum(size for unit, (_, size) in cache.stamps.items() if unit.startswith("train/"))
        limit = f"limit {size_text(cache.limit)}" if cache.limit else "no limit"
        lines.append(f"shard cache {cache.folder}: {size_text(since)} downloaded ({since / max(data, 1):.2f}x the "
                     f"training shards), at most {size_text(totals['peak'])} held ({limit})")
    return "; ".join(lines) or None
