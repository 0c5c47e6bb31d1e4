"""Shared test helpers: a small generated JPEG dataset (made once per session), one way to run a script in
a subprocess (with the environment every subprocess test needs), the tiny-run overrides, and data plans.
Tests marked `dali` and runs that read images with DALI skip where DALI cannot be imported (the GPU machines
lent to this project have none); tests marked `cuda` skip without a GPU."""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from resnest_train.cluster.distributed import DistInfo
from resnest_train.config_yaml import from_dict
from resnest_train.data.order import TrainOrder
from resnest_train.data.plan import DataPlan, build_data_plan
from resnest_train.recipe.schedule import BatchLayout

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")
# A run that takes seconds on 2 cores: 4 classes of 32 px crops, batches of 8.
TINY = ["model.num_classes=4", "data.crop_size=32", "data.val_crop_size=32", "data.workers=1",
        "train.batch_size=8", "train.log_interval=1"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]

torch.set_num_threads(2)


@functools.cache
def dali_importable() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def skip_unless_dali(args: list) -> None:
    """Skip the calling test where DALI cannot be imported and `args` (a train.py or evaluate.py command on
    the demo config, whose backend is DALI) read a data root with no other backend named."""
    args = [str(arg) for arg in args]
    backends = [arg.split("=", 1)[1] for arg in args if arg.startswith("data.backend=")]
    reads_images = any(arg.startswith("data.root=") for arg in args)
    if reads_images and (backends or ["dali"])[-1] == "dali" and not dali_importable():
        pytest.skip("DALI cannot be imported: the run reads images with data.backend=dali")


def pytest_runtest_setup(item) -> None:
    if item.get_closest_marker("dali") and not dali_importable():
        pytest.skip("DALI cannot be imported")
    if item.get_closest_marker("cuda") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


def script_env(**extra: str) -> dict:
    """One thread per process (tests start several), and torchrun's store not shared across restarts
    (pytorch/pytorch#135712, README)."""
    return dict(os.environ, OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1", **extra)


def run_script(args: list[str], *, expect: int | None = 0, launcher: list[str] | None = None, timeout: float = 600,
               **kwargs) -> subprocess.CompletedProcess:
    """Run `python SCRIPT ARGS` (or `launcher SCRIPT ARGS`) from the project root; check the exit code
    unless `expect` is None."""
    skip_unless_dali(args)
    env = kwargs.pop("env", None) or script_env()
    result = subprocess.run([*(launcher or [sys.executable]), *args], capture_output=True, text=True, cwd=ROOT,
                            timeout=timeout, env=env, **kwargs)
    if expect is not None:
        assert result.returncode == expect, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def train_args(root, out, *extra: str) -> list[str]:
    """train.py on the demo config, shrunk to TINY, on `root` (None: the synthetic backend)."""
    data = [f"data.root={root}"] if root is not None else ["data.backend=synthetic", "data.synthetic_size=64"]
    args = [str(ROOT / "train.py"), "--config", DEMO, f"output_dir={out}", *data, *TINY, *extra]
    skip_unless_dali(args)  # also for the tests that start the run themselves (Popen)
    return args


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_plan(root, *, rank: int = 0, world_size: int = 1, seed: int = 0, channels_last: bool = False,
              **data) -> DataPlan:
    """The plan a run with these data.* values would use (CPU, one worker, 32 px crops by default)."""
    values = {"root": str(root), "workers": 1, "crop_size": 32, "val_crop_size": 32, **data}
    config = from_dict({"model": {"num_classes": 4}, "data": values,
                        "train": {"seed": seed, "channels_last": channels_last}})
    return build_data_plan(config, DistInfo(rank, rank, world_size, torch.device("cpu")))


def make_order(num_samples: int, batch_size: int, *, world_size: int = 1, rank: int = 0,
               global_batch: int | None = None, seed: int = 0, repeats: int = 1, groups: torch.Tensor | None = None,
               window: int = 1, earlier_seed: tuple[int, int] | None = None) -> TrainOrder:
    """Process `rank`'s data order over `num_samples` training samples (global batch: one micro-batch per
    process unless given; `repeats`: train.repeated_augment; `groups`, `window`: data.shuffle=shards with
    each sample's shard and data.shuffle_window)."""
    layout = BatchLayout(global_batch or batch_size * world_size, batch_size, world_size)
    return TrainOrder(seed, num_samples, layout, num_samples // layout.global_batch, rank, earlier_seed,
                      repeats=repeats, groups=groups, window=window)


@pytest.fixture(scope="session")
def image_root(tmp_path_factory) -> Path:
    """4 classes x 12 train / 5 val JPEGs of 40 px, classes recoverable from the pixels."""
    out = tmp_path_factory.mktemp("images")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_synthetic_dataset.py"), "--out", str(out),
                    "--classes", "4", "--train-per-class", "12", "--val-per-class", "5", "--size", "40"],
                   check=True, capture_output=True)
    return out


@dataclass
class RankResult:
    returncode: int
    stderr: str
    errors: list[str]  # its `error:` lines
    first_error: float | None  # time.monotonic() when its first `error:` line came
    ended: float  # time.monotonic() when it exited


def _read_lines(stream, lines: list[tuple[float, str]]) -> None:
    for line in stream:
        lines.append((time.monotonic(), line))


def launch_ranks(args: list[str], *, world_size: int = 2, timeout: float = 180, **env: str) -> list[RankResult]:
    """`python ARGS` as ranks 0..world_size-1 of one gloo group, started directly (no launcher that would
    kill the others when one fails): what each rank printed and when it said `error:` and ended."""
    port = str(free_port())
    processes, readers, lines = [], [], []
    for rank in range(world_size):
        process = subprocess.Popen([sys.executable, *args], cwd=ROOT, text=True, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE,
                                   env=script_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                                                  MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **env))
        lines.append([])
        readers.append(threading.Thread(target=_read_lines, args=(process.stderr, lines[-1]), daemon=True))
        readers[-1].start()
        processes.append(process)
    results = []
    for process, reader, said in zip(processes, readers, lines):
        try:
            process.wait(timeout=timeout)
        finally:
            for other in processes:
                if other.poll() is None and process.returncode is None:
                    other.kill()
        ended = time.monotonic()
        reader.join(timeout=10)
        errors = [(when, line.rstrip("\n")) for when, line in said if line.startswith("error: ")]
        results.append(RankResult(process.returncode, "".join(line for _, line in said), [e for _, e in errors],
                                  errors[0][0] if errors else None, ended))
    return results


def assert_one_error_everywhere(results: list[RankResult], start: str, *, within: float = 15.0) -> str:
    """Every rank exits 2 with the same single `error:` line (starting `start`), no traceback, and within
    `within` seconds of the first error line any rank printed. Returns the line."""
    for rank, result in enumerate(results):
        assert result.returncode == 2 and "Traceback" not in result.stderr, (rank, result.stderr[-3000:])
        assert len(result.errors) == 1, (rank, result.errors)
    lines = {result.errors[0] for result in results}
    assert len(lines) == 1, lines
    line = lines.pop()
    assert line.startswith(f"error: {start}"), line
    first = min(result.first_error for result in results)
    slowest = max(result.ended for result in results) - first
    assert slowest < within, f"the last rank exited {slowest:.1f} s after the first error line"
    return line
