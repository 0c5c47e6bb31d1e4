"""Reading samples (data/sample_read.py): shard descriptors stay bounded over many shards and epochs (also
under a `ulimit -n` just above the bound, through a whole run), threads read the right bytes while
descriptors are evicted, and a read failure is a `SampleReadError` naming the image, never an undecodable
image recorded for good."""

from __future__ import annotations

import io
import os
import random
import shutil
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest

from resnest_train.data import sample_read
from resnest_train.data.index import load_index
from resnest_train.data.sample_read import SampleReadError, ShardFiles, find_undecodable, read_sample
from tests.conftest import ROOT, script_env, train_args


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def write_shards(root: Path, images: list[tuple[bytes, int]], *, per_shard: int = 1, split: str = "train") -> None:
    """`images` (bytes, label) as webdataset shards of `per_shard` samples each."""
    folder = root / split
    folder.mkdir(parents=True, exist_ok=True)
    for first in range(0, len(images), per_shard):
        with tarfile.open(folder / f"{split}-{first // per_shard:06d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for i, (data, label) in enumerate(images[first:first + per_shard], start=first):
                for name, payload in ((f"s{i:06d}.jpg", data), (f"s{i:06d}.cls", f"{label}\n".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))


@pytest.fixture(scope="module")
def many_shards(image_root, tmp_path_factory) -> Path:
    """300 one-sample training shards (more than the descriptor bound and than the old cache's 256)."""
    jpegs = sorted((image_root / "train").rglob("*.jpg"))
    out = tmp_path_factory.mktemp("many")
    write_shards(out, [(jpegs[i % len(jpegs)].read_bytes(), i % 4) for i in range(300)])
    val = sorted((image_root / "val").rglob("*.jpg"))
    write_shards(out, [(path.read_bytes(), i % 4) for i, path in enumerate(val)], per_shard=4, split="val")
    return out


def test_shard_descriptors_stay_bounded_over_epochs(many_shards):
    index = load_index(many_shards)
    assert len(index.train) == 300 and len(index.train.dirs) == 300
    sample_read.SHARDS.close()
    before = open_descriptors()
    counts = []
    for epoch in range(3):
        order = list(range(300))
        random.Random(epoch).shuffle(order)
        for i in order:
            read_sample(many_shards, index.train, i)
        counts.append(open_descriptors())
    assert len(sample_read.SHARDS) == sample_read.MAX_OPEN_SHARDS
    assert max(counts) <= before + sample_read.MAX_OPEN_SHARDS, counts  # the old cache: 326, 498, 676
    assert counts[0] == counts[1] == counts[2]
    sample_read.SHARDS.close()
    assert open_descriptors() == before


def test_threads_read_the_right_bytes_while_descriptors_are_evicted(many_shards, monkeypatch):
    index = load_index(many_shards)
    monkeypatch.setattr(sample_read, "SHARDS", ShardFiles(limit=3))
    expected = [read_sample(many_shards, index.train, i) for i in range(40)]
    errors = []

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(300):
            i = rng.randrange(40)
            if read_sample(many_shards, index.train, i) != expected[i]:
                errors.append(i)

    threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(sample_read.SHARDS) <= 3
    sample_read.SHARDS.close()
    assert len(sample_read.SHARDS) == 0


def test_a_read_failure_is_not_an_undecodable_image(image_root, tmp_path, monkeypatch):
    monkeypatch.setattr(sample_read, "READ_RETRY_DELAYS", (0.0, 0.0))
    root = tmp_path / "data"
    shutil.copytree(image_root, root)
    index = load_index(root)
    (root / index.train.path(3)).unlink()
    with pytest.raises(SampleReadError, match=r"cannot read .*train_000_00003\.jpg \(deleted since the dataset"):
        read_sample(root, index.train, 3)
    with pytest.raises(SampleReadError):  # the thorough check does not turn it into "undecodable"
        find_undecodable(root, index.train.take(range(6)))


def test_a_read_that_fails_once_is_tried_again(image_root, tmp_path, monkeypatch):
    monkeypatch.setattr(sample_read, "READ_RETRY_DELAYS", (0.0, 0.0))
    index = load_index(image_root)
    real, calls = sample_read._read_once, []

    def flaky(*args):
        calls.append(1)
        if len(calls) == 1:
            raise OSError(5, "Input/output error")
        return real(*args)

    monkeypatch.setattr(sample_read, "_read_once", flaky)
    assert read_sample(image_root, index.train, 0) == (image_root / index.train.path(0)).read_bytes()
    assert len(calls) == 2


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torchvision", "dali"])
def test_a_run_over_more_shards_than_the_bound_under_a_low_ulimit(many_shards, tmp_path, backend):
    """Several epochs over 300 shards with `ulimit -n` 160: a little above the bound plus what torch, DALI
    and the DataLoader workers hold open (about 60 without shards)."""
    out = tmp_path / "run"
    args = train_args(many_shards, out, f"data.backend={backend}", "train.epochs=4", "train.global_batch=40",
                      "train.batch_size=20")
    command = f"ulimit -n 160 && exec {sys.executable} " + " ".join(f"'{a}'" for a in args)
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, cwd=ROOT, env=script_env(),
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (out / "undecodable.txt").exists()
    assert "Too many open files" not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torchvision", "dali"])
def test_a_training_image_gone_after_indexing_stops_the_run_and_records_nothing(image_root, tmp_path, backend):
    """A file removed behind the index's back (its folder's stamp restored: the warm index still lists it,
    as when a network disk is remounted): one error line naming it, exit 2, nothing in undecodable.txt."""
    root = tmp_path / "data"
    shutil.copytree(image_root, root)
    train = load_index(root).train
    victim = root / train.path(5)
    folder_stat = victim.parent.stat()
    victim.unlink()
    os.utime(victim.parent, ns=(folder_stat.st_atime_ns, folder_stat.st_mtime_ns))
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, *train_args(root, out, f"data.backend={backend}", "train.epochs=1")],
                            capture_output=True, text=True, cwd=ROOT, env=script_env(), timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"cannot read {victim} (deleted since the dataset was indexed" in errors[0], errors
    assert "Traceback" not in result.stderr
    assert not (out / "undecodable.txt").exists()
