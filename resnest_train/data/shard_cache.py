"""The node-local cache of a remote data root's shards: one download per node, never above its limit,
evicting the shard whose next use is farthest away.

Epoch e's order is a function of (seed, e) (order.py), so the node knows which shard every coming step
reads: `NextUse` holds, per shard, the steps of this epoch and the next that read it, and the cache evicts
the shard used farthest in the future (Belady's rule, optimal for a known sequence; an LRU cache re-fetches
what it evicted a moment ago: MosaicML Streaming #658). Validation shards are next used at the epoch's end.

Files: `<cache_dir>/<split>/<shard>.tar`, complete and checked (size) or absent. A download goes to a
`.part` file of the shard's full size (counted in the total from its first byte), renamed when whole; the
node's processes (ranks, DataLoader workers) agree through file locks: a shard's lock (one download per
node: a process needing a shard another is fetching waits for it), the folder's lock (room is made and
taken atomically, so the files never exceed `data.cache_limit`), and each reader's shared lock on the file it
reads (an eviction skips a shard being read). A `.part` file of a process that died is removed at start.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import logging
import os
import queue
import threading
import time
from pathlib import Path

import numpy as np

from resnest_train.data import store
from resnest_train.data.cache_locks import alive, close_held, downloading, locked, open_held
from resnest_train.data.next_use import NEVER, NextUse
from resnest_train.errors import size_text

log = logging.getLogger(__name__)

WAIT_FOR_ROOM = 120.0  # seconds a download waits for shards being read to be released before it gives up


class ShardCache:
    """The cache of one remote root on this node; `stamps`: each shard's (tag, size) as the index saw it."""

    def __init__(self, root: str, folder: str | Path, stamps: dict[str, tuple[int, int]], limit: int | None = None,
                 prefetch: int = 0, policy: str = "belady"):
        self.root, self.folder, self.stamps = root, Path(folder), stamps
        self.limit, self.prefetch, self.policy = limit, prefetch, policy
        self.future = NextUse(sorted(stamps))
        self.now = 0.0
        self.pid, self.wake, self.inflight = os.getpid(), threading.Event(), set()
        (self.folder / ".locks").mkdir(parents=True, exist_ok=True)
        self._remove_stale_parts()
        atexit.register(self._remove_own_parts)  # a prefetch cut short by the exit leaves no .part file
        self.jobs: queue.Queue | None = None
        self.evaluating = False  # an evaluation is reading the validation shards (`evaluation`)
        self.reported = self.node_stats()["downloaded"]  # epoch_report: the traffic since
        self.order, self.unit_of_dir, self.dir_ids = None, np.zeros(0, np.int64), np.zeros(0, np.int64)

    def follow(self, samples, order) -> None:
        """Learn the training order (`order.TrainOrder` over the training list `samples`): eviction and
        prefetch follow it from the next `set_epoch`."""
        self.order, self.dir_ids = order, samples.dir_ids
        self.unit_of_dir = np.array([self.future.ids.get(unit, -1) for unit in samples.dirs], dtype=np.int64)
        if order.rank == 0:
            self._warn_thrashing(order)

    def _warn_thrashing(self, order) -> None:
        """A cache below the training shards' size with the global order: most reads fetch a whole shard."""
        data = sum(size for unit, (_, size) in self.stamps.items() if unit.startswith("train/"))
        if self.limit is None or self.limit >= data or order.groups is not None:
            return
        held = self.limit / data
        traffic = order.num_samples * (1 - held) * data / max(1, len(self.unit_of_dir))
        log.warning("data.shuffle=global with data.cache_limit holding %.0f%% of the training shards: an image's "
                    "shard is cached about %.0f%% of the time, so an epoch fetches about %s (%.0fx the data) or "
                    "more; data.shuffle=shards reads each shard about once per epoch", 100 * held, 100 * held,
                    size_text(traffic), traffic / data)

    def set_epoch(self, epoch: int, start_step: int) -> None:
        """The steps at which each shard is read, from `start_step` of `epoch` to the end of the next epoch
        (the whole node's: every rank's micro-batches)."""
        if self.order is None:
            return
        steps, batch = self.order.steps_per_epoch, self.order.layout.global_batch
        spans = []
        for e, first in ((epoch, start_step), (epoch + 1, 0)):
            positions = self.order.epoch_order(e)[first * batch:steps * batch].numpy()
            spans.append((e * steps + first, self.unit_of_dir[self.dir_ids[positions]]))
        self.future.plan(spans, steps, batch)
        self.now = -1.0  # a new epoch, or a run resumed: the clock starts where the reader does
        self.advance(epoch * steps + start_step)

    def advance(self, now: float) -> None:
        """The node's reader is at step `now` (from the run's start): what is fetched ahead follows it, and
        the node's forked readers (DataLoader workers) read the step from the clock file."""
        if now > self.now and os.getpid() == self.pid:
            clock = self.folder / ".locks" / f"clock.{os.getpid()}"
            clock.write_text(str(now))
            os.replace(clock, self.folder / ".locks" / "clock")
        self.now = max(self.now, now)
        if not self.prefetch or os.getpid() != self.pid:  # a forked DataLoader worker fetches on demand only
            return
        if self.jobs is None:
            self.jobs = queue.Queue()
            for _ in range(self.prefetch):
                threading.Thread(target=self._prefetcher, daemon=True, name="shard-prefetch").start()
        for unit in self.future.coming(now, 2 * self.prefetch, self.evaluating):
            if len(self.inflight) >= self.prefetch:
                break
            if unit not in self.inflight and not self._present(unit):
                self.inflight.add(unit)
                self.jobs.put(unit)

    def _prefetcher(self) -> None:
        """One of `prefetch` threads: fetch the shards asked for; a failure is left for the read that needs
        the shard, which meets it again and reports it."""
        while True:
            unit = self.jobs.get()
            try:
                self.fetch(unit, demand=False)
            except Exception:  # noqa: BLE001 - reported by the read that needs it
                log.debug("prefetch of %s failed", unit, exc_info=True)
            finally:
                self.inflight.discard(unit)

    def path(self, unit: str) -> Path:
        return self.folder / unit

    def _lock_path(self, unit: str) -> Path:
        return self.folder / ".locks" / (unit.replace("/", "__") + ".lock")

    def _present(self, unit: str) -> bool:
        try:
            return self.path(unit).stat().st_size == self.stamps[unit][1]
        except OSError:
            return False

    def read(self, unit: str, start: int, size: int) -> bytes:
        """`size` bytes at `start` of the shard, from its local copy (fetched first where missing); the
        copy is held by a shared lock while it is read, so no eviction removes it mid-read."""
        when = self.future.next(unit, self.now, self.evaluating)
        if when < NEVER and not unit.startswith("val/"):  # the reader is at least where this shard is read next
            self.now = max(self.now, when)
        for _ in range(3):
            path = self.local(unit)
            try:
                fd = open_held(Path(path), os.O_RDONLY)
            except FileNotFoundError:  # evicted between the check and the open: fetched again
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_SH)
                return os.pread(fd, size, start)
            finally:
                close_held(fd)
        raise store.StoreError(f"the cached copy of {store.join(self.root, unit)} keeps being evicted while it is "
                               f"needed: raise data.cache_limit ({self.limit} bytes)")

    def local(self, unit: str) -> str:
        """The local copy of `unit`, fetched now when missing (or waited for, when another process of the
        node is fetching it)."""
        if self._present(unit):
            if self.policy == "lru":
                os.utime(self.path(unit))
            return str(self.path(unit))
        self.fetch(unit, demand=True)
        return str(self.path(unit))

    def fetch(self, unit: str, demand: bool) -> bool:
        """Download `unit` unless present; False where a prefetch found no room it may take."""
        with locked(self._lock_path(unit)):  # one download per node
            if self._present(unit):
                return True
            size = self.stamps[unit][1]
            part = self.path(unit).with_name(f".{self.path(unit).name}.{os.getpid()}.{threading.get_ident()}.part")
            if not self._take_room(unit, size, part, demand):
                return False
            try:
                with downloading():  # a fork (a DataLoader worker) waits for it
                    self._download(unit, part, size)
                os.replace(part, self.path(unit))
            finally:
                part.unlink(missing_ok=True)
            return True

    def _download(self, unit: str, part: Path, size: int) -> None:
        url = store.join(self.root, unit)
        if store.stamp_of(store.info(url)) != self.stamps[unit]:
            raise store.StoreError(f"{url} changed since the dataset was indexed (its ETag or size differs): nothing "
                                   "is recorded about its images; rerun the same command to index it again")
        store.download(url, str(part))
        if part.stat().st_size != size:
            raise store.StoreError(f"{url}: downloaded {part.stat().st_size} bytes, the index knows {size}: rerun "
                                   "the same command")

    def _take_room(self, unit: str, size: int, part: Path, demand: bool) -> bool:
        """Under the folder's lock: evict until `size` more bytes fit, then reserve them (the `.part` file
        at full size). A prefetch evicts only shards needed later than `unit`; a demand waits for shards
        being read to be released."""
        part.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + WAIT_FOR_ROOM
        while True:
            with locked(self.folder / ".locks" / "folder.lock"):
                if self._make_room(unit, size, demand):
                    with open(part, "wb") as file:
                        file.truncate(size)
                    self._count(size)
                    return True
            if not demand:
                return False
            if time.monotonic() > deadline:
                raise store.StoreError(f"data.cache_limit ({self.limit} bytes) cannot hold the shards read at "
                                       f"once and {unit} ({size} bytes): raise it, or lower data.shuffle_window")
            time.sleep(0.05)

    def _count(self, size: int) -> None:
        """The node's totals (every process's downloads), under the folder's lock: `node_stats`."""
        totals = self.node_stats()
        totals["downloaded"] += size
        totals["peak"] = max(totals["peak"], self.usage())
        (self.folder / ".locks" / "stats.json").write_text(json.dumps(totals))

    def node_stats(self) -> dict:
        """Bytes downloaded by this node's processes since the cache folder was made, and the most it held."""
        try:
            return json.loads((self.folder / ".locks" / "stats.json").read_text())
        except (OSError, ValueError):
            return {"downloaded": 0, "peak": 0}

    def usage(self) -> int:
        """The bytes the cache holds and has reserved: a `.part` file counts at its shard's full size (a
        download writes it from its first byte: its size on disk is not what it will take)."""
        total = 0
        for split in ("train", "val"):
            for entry in os.scandir(self.folder / split) if (self.folder / split).is_dir() else ():
                if entry.name.endswith(".part"):
                    stamp = self.stamps.get(f"{split}/{entry.name[1:].split('.tar.')[0]}.tar")
                    total += stamp[1] if stamp else _size(entry)
                else:
                    total += _size(entry)
        return total

    def _make_room(self, unit: str, size: int, demand: bool) -> bool:
        if self.limit is None:
            return True
        if os.getpid() != self.pid:  # a forked reader: at least the step its parent has reached
            try:
                self.now = max(self.now, float((self.folder / ".locks" / "clock").read_text()))
            except (OSError, ValueError):
                pass
        free = self.limit - self.usage()
        need = self.future.next(unit, self.now, self.evaluating)
        for when, other in self._candidates():
            if free >= size:
                break
            if not demand and when <= need:
                return False
            free += self._evict(other)
        return free >= size

    def _candidates(self) -> list[tuple[float, str]]:
        """Cached shards, the first to evict first: farthest next use (Belady), or least recently used."""
        units = [unit for unit in self.stamps if self.path(unit).is_file()]
        if self.policy == "lru":
            stamp = {unit: self.path(unit).stat().st_mtime_ns for unit in units}
            return [(NEVER, unit) for unit in sorted(units, key=stamp.get)]
        return sorted(((self.future.next(unit, self.now, self.evaluating), unit) for unit in units), reverse=True)

    def _evict(self, unit: str) -> int:
        """Remove `unit`'s copy unless a reader holds it; the bytes freed."""
        try:
            fd = open_held(self.path(unit), os.O_RDONLY)
        except FileNotFoundError:
            return 0
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            close_held(fd)
            return 0
        try:
            size = os.fstat(fd).st_size
            self.path(unit).unlink()
        finally:
            close_held(fd)
        return size

    def _remove_own_parts(self) -> None:
        for part in self.folder.rglob(f".*.{os.getpid()}.*.part"):
            part.unlink(missing_ok=True)

    def _remove_stale_parts(self) -> None:
        for part in self.folder.rglob(".*.part"):
            pid = int(part.name.split(".")[-3]) if part.name.split(".")[-3].isdigit() else 0
            if pid and not alive(pid):
                part.unlink(missing_ok=True)


def _size(entry: os.DirEntry) -> int:
    try:
        return entry.stat().st_size
    except FileNotFoundError:  # evicted or renamed while listed
        return 0
