"""The I/O benchmarks of scripts/benchmark.py: the dataset index scan and checkpoint saves.

  benchmark.py scan --root DIR [--make 100000] [--processes 1 16] [--drop-caches]
      index scan rate (files/s) with each number of processes, rounds interleaved; --make N first writes N tiny
      JPEGs (100 classes) under DIR; --drop-caches empties the page cache before each scan (root only),
      which is what a first scan of a large dataset meets.
  benchmark.py checkpoint [--model resnest269] [--rounds 3]
      one save of the model + SGD momentum state as the trainer does it (last.pt written once, step and
      best files linked) vs three full writes, and the resume read (memory-mapped) of the file.
"""

from __future__ import annotations

import io
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def make_tiny_jpegs(root: Path, count: int) -> None:
    from PIL import Image
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (120, 30, 200)).save(buffer, format="JPEG")
    data = buffer.getvalue()
    classes = 100
    for split, per_class in (("train", count // classes), ("val", 1)):
        for label in range(classes):
            folder = root / split / f"class_{label:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                (folder / f"{i:06d}.jpg").write_bytes(data)


def _drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


_SCAN = """import sys, time
from resnest_train.data.index import scan_files
started = time.perf_counter()
_, table = scan_files(sys.argv[1], processes=int(sys.argv[2]))
print(len(table), time.perf_counter() - started)
"""


def _timed_scan(root: Path, processes: int) -> tuple[int, float]:
    """In a `python -c` process, as the trainer runs it: the scan's spawned workers re-import the main
    module, which for this script would mean importing torch once per worker."""
    out = subprocess.run([sys.executable, "-c", _SCAN, str(root), str(processes)], check=True, capture_output=True,
                         text=True, cwd=Path(__file__).resolve().parents[1]).stdout.split()
    return int(out[0]), float(out[1])


def bench_scan(args) -> dict:
    root = Path(args.root)
    if args.make:
        make_tiny_jpegs(root, args.make)
    rates: dict[int, list[float]] = {t: [] for t in args.threads}
    files = 0
    for _ in range(args.rounds):
        for threads in args.threads:
            if args.drop_caches:
                _drop_caches()
            files, seconds = _timed_scan(root, threads)
            rates[threads].append(files / seconds)
    result = {"files": files, "drop_caches": args.drop_caches}
    for threads, values in rates.items():
        result[f"files_per_sec_{threads}_processes"] = statistics.median(values)
        result[f"us_per_file_{threads}_processes"] = 1e6 / statistics.median(values)
    return result


def _state(model_name: str) -> dict:
    from resnest_train.models import create_model
    model = create_model(model_name)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()  # creates the momentum buffers a real checkpoint holds
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 1, "batch": 0,
            "step": 1, "ranks": [{}]}


def bench_checkpoint(args) -> dict:
    from resnest_train import checkpoint as ckpt
    state = _state(args.model)
    times: dict[str, list[float]] = {"linked": [], "three_writes": [], "resume_read": []}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for round_ in range(args.rounds):
            started = time.perf_counter()
            ckpt.save_checkpoint({**state, "step": round_ + 1}, tmp, keep_last=3, is_best=True)
            times["linked"].append(time.perf_counter() - started)
            folder = Path(tmp) / "copies"
            started = time.perf_counter()
            for name in ("last.pt", f"step-{round_:09d}.pt", "best.pt"):
                ckpt.atomic_save(state, folder / name)
            times["three_writes"].append(time.perf_counter() - started)
            started = time.perf_counter()
            loaded = ckpt.find_resume_state("auto", tmp)
            sum(t.float().sum() for t in loaded["model"].values())  # touch every tensor once
            times["resume_read"].append(time.perf_counter() - started)
        size = (Path(tmp) / "checkpoints" / "last.pt").stat().st_size
    result = {"model": args.model, "checkpoint_mb": round(size / 2**20, 1)}
    result.update({f"{name}_seconds": round(statistics.median(values), 3) for name, values in times.items()})
    return result


def add_parsers(sub) -> None:
    scan = sub.add_parser("scan")
    scan.add_argument("--root", required=True)
    scan.add_argument("--make", type=int, default=0)
    scan.add_argument("--processes", dest="threads", type=int, nargs="+", default=[1, 16])
    scan.add_argument("--rounds", type=int, default=3)
    scan.add_argument("--drop-caches", action="store_true")
    checkpoint = sub.add_parser("checkpoint")
    checkpoint.add_argument("--model", default="resnest269")
    checkpoint.add_argument("--rounds", type=int, default=3)
    checkpoint.add_argument("--dir", default=None, help="where to write (default: the system temp folder)")
