"""Reading a sample's encoded bytes (a file, or a byte range of a shard) and telling a read failure from a
decode failure.

Shards are read with `pread` on descriptors kept open between reads (no file opened per image), at most
`MAX_OPEN_SHARDS` per process: the least recently used one is closed when another is needed, and a
descriptor in use by a reading thread is closed only once that read is done. A forked process (a DataLoader
worker) closes its inherited copies before its first read. ImageNet's public webdataset copy has 1,024
training shards and clusters often set `ulimit -n 1024`: the bound keeps a process far below it.

A read that fails (a file deleted since indexing, a data root gone for a moment, EIO, EMFILE) is tried again
a few times and then raises `SampleReadError`: the image was never seen, so it is not recorded as
undecodable (undecodable.py); only an image read completely that fails to decode is.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from resnest_train.data.filescan import decode_bytes_error
from resnest_train.data.index import DatasetError
from resnest_train.data.samples import SampleList
from resnest_train.data.shard_caches import cache_of
from resnest_train.data.store import StoreError, is_remote, under

MAX_OPEN_SHARDS = 64  # descriptors per process; a reading thread may hold one more while it is evicted
READ_RETRY_DELAYS = (0.5, 2.0)  # seconds before the 2nd and 3rd try of a failed read (a remount, a hiccup)


class SampleReadError(DatasetError):
    """A sample could not be read (not: could not be decoded); nothing is recorded about the image."""


class ShardFiles:
    """Open shard descriptors by path, bounded, shared by the threads of one process."""

    def __init__(self, limit: int = MAX_OPEN_SHARDS):
        self.limit = limit
        self._reset()
        os.register_at_fork(after_in_child=self._after_fork)

    def _reset(self) -> None:
        self.lock = threading.Lock()
        self.open: OrderedDict[str, list[int]] = OrderedDict()  # path -> [fd, readers]; LRU first

    def _after_fork(self) -> None:
        """The child's inherited copies are its own descriptors: close them, start empty (the lock may have
        been held by a parent thread at the fork)."""
        for fd, _ in self.open.values():
            _close(fd)
        self._reset()

    def pread(self, path: str, size: int, start: int) -> bytes:
        entry = self._acquire(path)
        try:
            return os.pread(entry[0], size, start)
        finally:
            self._release(entry)

    def _acquire(self, path: str) -> list[int]:
        with self.lock:
            entry = self.open.get(path)
            if entry is not None:
                self.open.move_to_end(path)
            else:
                self._evict(self.limit - 1)
                entry = self.open[path] = [os.open(path, os.O_RDONLY), 0]
            entry[1] += 1
            return entry

    def _release(self, entry: list[int]) -> None:
        with self.lock:
            entry[1] -= 1
            if entry[1] == 0 and all(e is not entry for e in self.open.values()):
                _close(entry[0])  # evicted while this read was in flight

    def _evict(self, keep: int) -> None:
        while len(self.open) > keep:
            _, entry = self.open.popitem(last=False)
            if entry[1] == 0:
                _close(entry[0])

    def close(self) -> None:
        """Close every descriptor not in use (a loader is done; the next read opens again)."""
        with self.lock:
            self._evict(0)

    def __len__(self) -> int:
        return len(self.open)


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


SHARDS = ShardFiles()


def _read_once(root: str | Path, samples: SampleList, i: int) -> bytes:
    if is_remote(root):  # a remote shard: its node-local copy (shard_cache.py)
        size = int(samples.sizes[i])
        data = cache_of(root).read(samples.dirs[samples.dir_ids[i]], int(samples.starts[i]), size)
    elif samples.kind == "shards":
        size = int(samples.sizes[i])
        data = SHARDS.pread(os.path.join(root, samples.dirs[samples.dir_ids[i]]), size, int(samples.starts[i]))
    else:
        with open(os.path.join(root, samples.dirs[samples.dir_ids[i]], samples.name(i)), "rb") as file:
            return file.read()
    if len(data) != size:
        raise OSError(f"the shard ends inside this member: changed since it was indexed ({len(data)} of "
                      f"{size} bytes)")
    return data


def read_sample(root: str | Path, samples: SampleList, i: int) -> bytes:
    """Sample `i`'s encoded image: its file, or its byte range in its shard. A failed read is tried again
    (`READ_RETRY_DELAYS`), then raises `SampleReadError` naming the sample."""
    for delay in (*READ_RETRY_DELAYS, None):
        try:
            return _read_once(root, samples, i)
        except StoreError as exc:  # the store's own tries are done (store.attempt)
            raise SampleReadError(f"{exc}: nothing is recorded about its images") from None
        except OSError as exc:
            if delay is None:
                raise read_error(root, samples, i, exc) from None
            time.sleep(delay)
    raise AssertionError("unreachable")


def read_error(root: str | Path, samples: SampleList, i: int, exc: OSError) -> SampleReadError:
    why = "deleted since the dataset was indexed" if isinstance(exc, FileNotFoundError) else (exc.strerror or str(exc))
    tries = len(READ_RETRY_DELAYS) + 1
    return SampleReadError(f"cannot read {under(str(root), samples.path(i))} ({why}; tried {tries} "
                           "times): nothing is recorded about this image; rerun the same command once the data "
                           "is readable")


def find_undecodable(root: str | Path, samples: SampleList, workers: int | None = None) -> list[tuple[str, str]]:
    """Fully decode every image and return (path relative to root, why) for those that fail: the slow,
    thorough check, run only after a decoder has failed on a file that passed the cheap header/end check.
    An image that cannot be read raises `SampleReadError` (a read failure is not a decode failure).
    Threads (PIL decodes without the GIL), not forked processes: the caller runs DALI's threads."""
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        reasons = list(pool.map(lambda i: decode_bytes_error(read_sample(root, samples, i)), range(len(samples))))
    return [(samples.path(i), reason) for i, reason in enumerate(reasons) if reason]
