"""The scan table behind the dataset index: every entry of every class folder or shard, with the verdict of
its check, as flat arrays; and its cache file.

A unit is a class folder (`train/<class>`) or a shard (`train/<name>.tar`). A warm open stats each unit
only: a folder whose mtime is unchanged (files added, removed or renamed change it) or a shard whose size
and mtime are unchanged keeps its entries from the cache, without a look at its files; any other unit is
listed again, its unchanged files keeping their verdicts. A file overwritten in place leaves its folder's
mtime as it was: `python -m resnest_train.data.index ROOT --recheck` (README, "Data") looks at every file.
The cache is one uncompressed `.npz` (numpy's zip of arrays), beside the data or in ~/.cache when the data
is read-only: it opens in a fraction of a second at ImageNet's 1.33M files (BENCHMARKS.md).
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import zipfile
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from resnest_train.data.filescan import scan_unit

log = logging.getLogger(__name__)

CACHE_VERSION = 3
SCAN_PROCESSES = 16  # units in flight at once: I/O bound on network disks (BENCHMARKS.md, "index scan")
COLUMNS = ("size", "mtime", "start", "label", "reason")  # per entry; start/label -1 in a folder


@dataclass
class Chunk:
    """One unit's entries: names as one blob with their lengths, the columns, the reasons' texts (a
    reason column value is an index into them, -1: a usable image)."""

    stamp: tuple[int, int]  # (mtime_ns, size) of the unit; a folder's size is 0
    blob: np.ndarray
    lengths: np.ndarray
    columns: dict
    texts: list[str]

    @classmethod
    def of(cls, stamp: tuple[int, int], rows: list[tuple]) -> Chunk:
        """From (name, size, mtime, start, label, reason text or None) rows."""
        encoded = [row[0].encode() for row in rows]
        texts = sorted({row[5] for row in rows if row[5]})
        code = {text: i for i, text in enumerate(texts)}
        columns = {name: np.array([row[i + 1] for row in rows], dtype=np.int64) for i, name in enumerate(COLUMNS[:4])}
        columns["reason"] = np.array([code[row[5]] if row[5] else -1 for row in rows], dtype=np.int64)
        return cls(stamp, np.frombuffer(b"".join(encoded), dtype=np.uint8),
                   np.array([len(e) for e in encoded], dtype=np.int64), columns, texts)

    def names(self) -> list[str]:
        ends = np.cumsum(self.lengths)
        data = self.blob.tobytes()
        return [data[end - length:end].decode() for end, length in zip(ends.tolist(), self.lengths.tolist())]


@dataclass
class Table:
    units: list[str]
    chunks: list[Chunk]

    def chunk(self, unit: str) -> Chunk | None:
        if not hasattr(self, "_where"):
            self._where = {name: i for i, name in enumerate(self.units)}
        i = self._where.get(unit)
        return None if i is None else self.chunks[i]

    def save(self, path: Path) -> None:
        texts, columns = [], {name: [] for name in COLUMNS}
        for chunk in self.chunks:
            for name in COLUMNS[:4]:
                columns[name].append(chunk.columns[name])
            reason = chunk.columns["reason"]
            columns["reason"].append(np.where(reason >= 0, reason + len(texts), -1))
            texts += chunk.texts
        arrays = {name: _cat(parts, np.int64) for name, parts in columns.items()}
        np.savez(path, version=np.array(CACHE_VERSION), units=_strings(self.units), texts=_strings(texts),
                 stamps=np.array([c.stamp for c in self.chunks], dtype=np.int64).reshape(-1, 2),
                 counts=np.array([len(c.lengths) for c in self.chunks], dtype=np.int64),
                 blob=_cat([c.blob for c in self.chunks], np.uint8),
                 lengths=_cat([c.lengths for c in self.chunks], np.int64), **arrays)

    @classmethod
    def load(cls, path: Path) -> Table | None:
        """The table in `path`; None for another cache version; `DamagedCache` when it cannot be read whole
        (a truncated or altered file: zip's CRC-32 of each array tells)."""
        try:
            with np.load(path) as data:
                if int(data["version"]) != CACHE_VERSION:
                    return None
                arrays = {key: data[key] for key in data.files}
            table = cls._from_arrays(arrays)
        except (OSError, ValueError, KeyError, EOFError, IndexError, zipfile.BadZipFile, zlib.error) as exc:
            raise DamagedCache(f"{path} is damaged ({type(exc).__name__}: {exc})") from None
        return table

    @classmethod
    def _from_arrays(cls, arrays: dict) -> Table:
        units, texts = _unstrings(arrays["units"]), _unstrings(arrays["texts"])
        if len(units) != len(arrays["stamps"]) or int(arrays["counts"].sum()) != len(arrays["lengths"]):
            raise ValueError("its arrays do not agree in length")
        bounds = np.concatenate([[0], np.cumsum(arrays["counts"])])
        byte_bounds = np.concatenate([[0], np.cumsum(arrays["lengths"])])[bounds]
        chunks = []
        for i, stamp in enumerate(arrays["stamps"].tolist()):
            lo, hi = bounds[i], bounds[i + 1]
            columns = {name: arrays[name][lo:hi] for name in COLUMNS}
            used = sorted(set(columns["reason"][columns["reason"] >= 0].tolist()))
            remap = {old: new for new, old in enumerate(used)}
            if used:  # this chunk's own reason texts, renumbered from 0
                columns["reason"] = np.array([remap.get(v, -1) for v in columns["reason"].tolist()], dtype=np.int64)
            chunks.append(Chunk(tuple(stamp), arrays["blob"][byte_bounds[i]:byte_bounds[i + 1]],
                                arrays["lengths"][lo:hi], columns, [texts[v] for v in used]))
        return cls(units, chunks)


def _cat(parts: list, dtype) -> np.ndarray:
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype=dtype)


def _strings(values: list[str]) -> np.ndarray:
    return np.frombuffer("\n".join(values).encode(), dtype=np.uint8)


def _unstrings(array: np.ndarray) -> list[str]:
    text = array.tobytes().decode()
    return text.split("\n") if text else []


def unit_stamp(path: Path, shard: bool) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return (stat.st_mtime_ns, stat.st_size if shard else 0)


def scan_units(root: Path, units: list[str], shard: bool, cached: Table | None, *, recheck: bool = False,
               processes: int = SCAN_PROCESSES) -> Table:
    """The table of `units`: unchanged ones from `cached`, the others listed again (by a pool of processes:
    no GIL between them, many requests in flight on network disks)."""
    chunks: list[Chunk | None] = []
    tasks = []
    for unit in units:
        old = cached.chunk(unit) if cached is not None else None
        if old is not None and not recheck and unit_stamp(root / unit, shard) == old.stamp:
            chunks.append(old)
            continue
        known = {} if old is None or shard or recheck else {
            name: [size, mtime, old.texts[reason] if reason >= 0 else None]
            for name, size, mtime, reason in zip(old.names(), old.columns["size"].tolist(),
                                                  old.columns["mtime"].tolist(), old.columns["reason"].tolist())}
        tasks.append((len(chunks), (str(root / unit), shard, known)))
        chunks.append(None)
    if processes > 1 and len(tasks) > 1:
        # Fresh interpreters, not forks: a fork of a process running gloo or DALI threads can deadlock.
        # The workers import filescan.py alone (the standard library and PIL, no torch).
        with ProcessPoolExecutor(min(processes, len(tasks)), mp_context=multiprocessing.get_context("spawn")) as pool:
            fresh = list(pool.map(scan_unit, [task for _, task in tasks], chunksize=4))
    else:
        fresh = [scan_unit(task) for _, task in tasks]
    for (slot, _), (stamp, rows) in zip(tasks, fresh):
        chunks[slot] = Chunk.of(tuple(stamp), rows)
    return Table(list(units), chunks)


def cache_paths(root: Path | str) -> list[Path]:
    """Beside the data, else in ~/.cache; a remote root (a URL string) only in ~/.cache."""
    if isinstance(root, str):
        return [Path.home() / ".cache" / "resnest_train" / f"index-{hashlib.sha1(root.encode()).hexdigest()[:16]}.npz"]
    key = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]
    return [root / ".resnest_index.npz", Path.home() / ".cache" / "resnest_train" / f"index-{key}.npz"]


class DamagedCache(Exception):
    """An index cache file that cannot be read whole."""


def read_cache(root: Path) -> Table | None:
    """The fresher of the two caches (by the file's mtime: a read-only root keeps a stale copy beside the
    data while the fresh one lives in ~/.cache); a damaged one is named in a warning and left for the
    rewrite."""
    paths = [path for path in cache_paths(root) if path.is_file()]
    for path in sorted(paths, key=_mtime, reverse=True):
        try:
            table = Table.load(path)
        except DamagedCache as exc:
            log.warning("the index cache %s: it is rebuilt (delete it if this repeats)", exc)
            continue
        if table is not None:
            return table
    return None


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


def write_cache(root: Path, table: Table) -> None:
    """Atomically, beside the data or else in ~/.cache (read-only data)."""
    for path in cache_paths(root):
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp.npz")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                table.save(tmp)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
            return
        except OSError:
            continue
