"""Training images that cannot be decoded: the run folder's record of them and the one replacement rule
every backend follows.

An undecodable training image never changes how many micro-batches a rank trains (gradient accumulation and
the ranks' step counts stay whole): sample p is replaced by the next decodable image of the training list
(p + 1, p + 2, ..., wrapping), with p's augmentation draws, so the result is the same on any process count
and after any resume. The torchvision backend finds such images as it decodes and replaces them at once;
DALI's decoder stops the run naming them. Either way they are recorded in `output_dir/undecodable.txt` (one
path per line, relative to data.root, `shard.tar:member` inside shards): a restarted or requeued run names
them at start and replaces them without trying them again, so `torchrun --max-restarts` never replays a
known failure. To train on a repaired file again, delete its line.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from resnest_train.data.index import DatasetError
from resnest_train.data.sample_read import find_undecodable
from resnest_train.data.samples import SampleList
from resnest_train.data.store import under

log = logging.getLogger("resnest_train")

RECORD = "undecodable.txt"


class UndecodableError(DatasetError):
    """Images a decoder failed on; `paths` relative to data.root, recorded in the run folder."""

    def __init__(self, message: str, paths: list[str] = ()):
        super().__init__(message)
        self.paths = list(paths)


def undecodable_error(root: str | Path, samples: SampleList, *, otherwise: str, training: bool) -> DatasetError:
    """The error of a decoder that failed on one of `samples` (the batches that can have failed): each image
    a full decode fails on, named; `otherwise` where none does."""
    found = find_undecodable(root, samples)
    named = ", ".join(f"{under(str(root), path)} ({why})" for path, why in found) or otherwise
    then = "replaces it by the next image of the training list" if training else "leaves it out of the evaluation"
    return UndecodableError(f"cannot decode {named}; rerun the same command: a run in this folder {then} "
                            f"({RECORD} in the run folder)", [path for path, _ in found])


def read_record(output_dir: str | Path) -> list[str]:
    path = Path(output_dir) / RECORD
    if not path.is_file():
        return []
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def add_to_record(output_dir: str | Path, paths: list[str]) -> list[str]:
    """Add `paths` to the record (atomically: a temporary file, then a rename); returns those that were new."""
    known = read_record(output_dir)
    new = [path for path in dict.fromkeys(paths) if path not in known]
    if new:
        record = Path(output_dir) / RECORD
        tmp = record.with_name(f".{RECORD}.tmp")
        tmp.write_text("# training images that cannot be decoded: replaced by the next image of the training list "
                       "(delete a line to train on a repaired file)\n" + "".join(f"{p}\n" for p in known + new))
        os.replace(tmp, record)
        log.warning("recorded in %s: %s", record, ", ".join(new))
    return new


def known_positions(samples: SampleList, paths: list[str]) -> list[int]:
    """The training-list positions of the recorded paths that are in this list (sorted)."""
    positions = (samples.position(path) for path in paths)
    return sorted(p for p in positions if p is not None)


class Replacement:
    """Which image stands in for each sample: itself, or, for a known undecodable one, the next image of the
    training list that is not known to be undecodable."""

    def __init__(self, num_samples: int, undecodable: list[int] = ()):
        self.num_samples = num_samples
        self.undecodable = np.array(sorted(undecodable), dtype=np.int64)

    def __bool__(self) -> bool:
        return len(self.undecodable) > 0

    def is_known(self, position: int) -> bool:
        i = np.searchsorted(self.undecodable, position)
        return bool(i < len(self.undecodable) and self.undecodable[i] == position)

    def source(self, position: int) -> int:
        """`position` itself, or the next position (wrapping) not known to be undecodable."""
        for step in range(len(self.undecodable) + 1):
            candidate = (position + step) % self.num_samples
            if not self.is_known(candidate):
                return candidate
        raise ValueError("every training image is known to be undecodable")

    def sources(self, positions: np.ndarray) -> np.ndarray:
        if not self:
            return positions
        return np.array([self.source(p) for p in positions.reshape(-1).tolist()],
                        dtype=np.int64).reshape(positions.shape)
