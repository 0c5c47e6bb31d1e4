"""`SampleList`: a split's samples as a few flat arrays, not a list of Python tuples.

At ImageNet's 1.28M training images a list of (path, label) tuples costs every rank hundreds of MB and a
55 MB pickle to receive (BENCHMARKS.md, "ImageNet scale"). Here a sample is an entry of small arrays: the
folder (or shard) it lives in, its name as a slice of one UTF-8 blob, its label, and, inside a shard, the
byte range of its image. It still reads like the old list (`samples[i] -> (path, label)`, iteration,
`len`), and goes between ranks as one compressed buffer (`to_bytes` / `from_bytes`).

Paths are relative to `data.root`: `train/<class>/<file>` for a folder, `train/<shard>.tar:<member>` for an
image inside a shard (the name every error and warning uses).
"""

from __future__ import annotations

import io
import json
import zlib
from collections.abc import Sequence

import numpy as np


class SampleList(Sequence):
    """Samples of one split; `kind` is "folder" (one file per image) or "shards" (webdataset tars)."""

    def __init__(self, kind: str, dirs: list[str], dir_ids: np.ndarray, names: bytes | np.ndarray,
                 offsets: np.ndarray, labels: np.ndarray, starts: np.ndarray | None = None,
                 sizes: np.ndarray | None = None):
        self.kind, self.dirs = kind, list(dirs)
        self.dir_ids = np.asarray(dir_ids, dtype=np.int32)
        self.names = np.frombuffer(names, dtype=np.uint8) if isinstance(names, bytes) else names
        self.offsets = np.asarray(offsets, dtype=np.int64)  # name i is names[offsets[i]:offsets[i + 1]]
        self.labels = np.asarray(labels, dtype=np.int32)
        self.starts = None if starts is None else np.asarray(starts, dtype=np.int64)  # in the shard
        self.sizes = None if sizes is None else np.asarray(sizes, dtype=np.int64)

    @classmethod
    def from_pairs(cls, kind: str, dirs: list[str], entries: list[tuple[int, str, int]], starts=None,
                   sizes=None) -> SampleList:
        """From (dir id, name, label) triples."""
        encoded = [name.encode() for _, name, _ in entries]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(name) for name in encoded], out=offsets[1:])
        return cls(kind, dirs, np.array([d for d, _, _ in entries], dtype=np.int32), b"".join(encoded), offsets,
                   np.array([label for _, _, label in entries], dtype=np.int32), starts, sizes)

    def __len__(self) -> int:
        return len(self.labels)

    def name(self, i: int) -> str:
        return self.names[self.offsets[i]:self.offsets[i + 1]].tobytes().decode()

    def path(self, i: int) -> str:
        """The sample's path relative to the data root (`shard.tar:member` inside a shard)."""
        joiner = ":" if self.kind == "shards" else "/"
        return f"{self.dirs[self.dir_ids[i]]}{joiner}{self.name(i)}"

    def position(self, path: str) -> int | None:
        """The position of the sample whose `path()` is `path`, or None (only its folder's names compared).
        The folder is a prefix that names one of ours: member names may hold the joiner too (`a:b.jpg`)."""
        joiner = ":" if self.kind == "shards" else "/"
        dirs = {folder: d for d, folder in enumerate(self.dirs)}
        for cut in [i for i, char in enumerate(path) if char == joiner and path[:i] in dirs]:
            name = path[cut + 1:]
            for i in np.flatnonzero(self.dir_ids == dirs[path[:cut]]).tolist():
                if self.name(i) == name:
                    return i
        return None

    def __getitem__(self, item):
        if isinstance(item, slice):
            return self.take(np.arange(len(self))[item])
        if item < 0:
            item += len(self)
        if not 0 <= item < len(self):
            raise IndexError(item)
        return self.path(item), int(self.labels[item])

    def __iter__(self):
        """(path, label) pairs, decoded in one pass (the training-list fingerprint reads them all)."""
        data, offsets = self.names.tobytes(), self.offsets.tolist()
        joiner = ":" if self.kind == "shards" else "/"
        prefixes = [f"{folder}{joiner}" for folder in self.dirs]
        for i, (d, label) in enumerate(zip(self.dir_ids.tolist(), self.labels.tolist())):
            yield prefixes[d] + data[offsets[i]:offsets[i + 1]].decode(), label

    def __add__(self, other) -> list:
        return list(self) + list(other)

    def take(self, positions) -> SampleList:
        """The samples at `positions`, in that order (a rank's shard of the validation list)."""
        positions = np.asarray(positions, dtype=np.int64)
        lengths = self.offsets[positions + 1] - self.offsets[positions]
        offsets = np.zeros(len(positions) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        # gather the names' bytes: one index per byte of the chosen names
        index = np.repeat(self.offsets[positions] - offsets[:-1], lengths) + np.arange(offsets[-1])
        pick = (lambda a: None if a is None else a[positions])
        return SampleList(self.kind, self.dirs, self.dir_ids[positions], self.names[index], offsets,
                          self.labels[positions], pick(self.starts), pick(self.sizes))

    def nbytes(self) -> int:
        arrays = (self.dir_ids, self.names, self.offsets, self.labels, self.starts, self.sizes)
        return sum(a.nbytes for a in arrays if a is not None)

    def arrays(self, prefix: str) -> dict:
        """The arrays under `prefix`-ed names (the index cache and the buffer ranks receive)."""
        out = {"dir_ids": self.dir_ids, "names": self.names, "offsets": self.offsets, "labels": self.labels}
        if self.starts is not None:
            out.update(starts=self.starts, sizes=self.sizes)
        return {f"{prefix}{key}": value for key, value in out.items()}

    @classmethod
    def from_arrays(cls, kind: str, dirs: list[str], arrays, prefix: str) -> SampleList:
        get = (lambda key: arrays[f"{prefix}{key}"] if f"{prefix}{key}" in arrays else None)
        return cls(kind, dirs, get("dir_ids"), get("names"), get("offsets"), get("labels"), get("starts"),
                   get("sizes"))


def pack(meta: dict, lists: dict[str, SampleList | None]) -> bytes:
    """`meta` (JSON) and the lists as one zlib-compressed buffer (names compress about 5x)."""
    arrays = {"meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)}
    for split, samples in lists.items():
        if samples is not None:
            arrays.update(samples.arrays(f"{split}/"))
            arrays[f"{split}/dirs"] = np.frombuffer(json.dumps(samples.dirs).encode(), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return zlib.compress(buffer.getvalue(), 1)


def unpack(data: bytes, kind_of) -> tuple[dict, dict[str, SampleList]]:
    """What `pack` wrote: (meta, {split: SampleList}); `kind_of(meta)` names the lists' kind."""
    arrays = dict(np.load(io.BytesIO(zlib.decompress(data))))
    meta = json.loads(arrays.pop("meta").tobytes())
    lists = {}
    for key in [k for k in arrays if k.endswith("/dirs")]:
        split = key[:-len("/dirs")]
        lists[split] = SampleList.from_arrays(kind_of(meta), json.loads(arrays[key].tobytes()), arrays, f"{split}/")
    return meta, lists
