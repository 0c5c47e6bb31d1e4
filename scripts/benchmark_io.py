"""The I/O benchmarks of scripts/benchmark.py: the dataset index scan and checkpoint saves.

  benchmark.py scan --root DIR [--make 100000] [--processes 1 16] [--drop-caches]
      index scan rate (files/s) with each number of processes, rounds interleaved; --make N first writes N tiny
      JPEGs (100 classes) under DIR; --drop-caches empties the page cache before each scan (root only),
      which is what a first scan of a large dataset meets.
  benchmark.py checkpoint [--model resnest269] [--rounds 3]
      one save of the model + SGD momentum state as the trainer does it (last.pt written once, step and
      best files linked) vs three full writes, and the resume read (memory-mapped) of the file.
  benchmark.py checkpoint --blocking [--model resnest50] [--rounds 5] [--threads 2]
      how long the caller is blocked per save: a synchronous save_checkpoint vs snapshot + a background
      CheckpointWriter.submit, rounds interleaved; the background write's duration and the time of a
      resnest14 training step (batch 8, 64 px) while it runs vs with no write; and the per-rank state
      stored in a checkpoint (RNG as lists of ints, as before, vs the compact tensors), for 1 and 64 ranks.
"""

from __future__ import annotations

import io
import pickle
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
index, _ = scan_files(sys.argv[1], processes=int(sys.argv[2]))
print(len(index.train) + len(index.val) + len(index.skipped), time.perf_counter() - started)
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
    from resnest_train.checkpoint import files as ckpt
    if args.blocking:
        return bench_checkpoint_blocking(args)
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
    checkpoint.add_argument("--blocking", action="store_true",
                            help="time the caller is blocked per save: synchronous vs background write")
    checkpoint.add_argument("--threads", type=int, default=2, help="torch threads of the training steps (--blocking)")


def rank_state_bytes(ranks: int = 64) -> dict:
    """Bytes of the per-rank part of a checkpoint as the trainer gathers it (`{"data": loader.state()}`,
    pickled as gather_object sends it): a DALI training loader over a generated folder, with and without
    AutoAugment, after one micro-batch of 8."""
    import dataclasses

    from resnest_train.data.dali_train import build_dali_train
    from resnest_train.data.index import load_index
    from resnest_train.data.order import TrainOrder
    from resnest_train.data.plan import DataPlan
    from resnest_train.recipe.schedule import BatchLayout
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        make_tiny_jpegs(Path(tmp), 800)
        index = load_index(tmp, write_cache=False)
        base = DataPlan(backend="dali", root=tmp, rank=0, world_size=1, device=torch.device("cpu"), decoder="cpu",
                        channels_last=False, workers=1, seed=0, num_classes=100, synthetic_size=0, crop_size=8,
                        rrc_scale=(0.5, 1.0), hflip=True, autoaugment="none", autoaugment_on="crop",
                        color_jitter=0.4, lighting=0.1, interpolation="bilinear", val_crop_size=8, val_resize_size=8)
        order = TrainOrder(0, len(index.train), BatchLayout(8, 8, 1), len(index.train) // 8, 0)
        for policy in ("none", "imagenet"):
            loader = build_dali_train(dataclasses.replace(base, autoaugment=policy), index.train, order)
            loader.set_epoch(0)
            next(iter(loader))
            size = len(pickle.dumps({"data": loader.state()}))
            result[f"rank_state_dali_{policy}_bytes"] = size
            result[f"rank_state_dali_{policy}_{ranks}_ranks_bytes"] = size * ranks
    return result


def _training_step():
    """One SGD step of resnest14 on a batch of 8 at 64 px: a stand-in for the loop that the write runs beside."""
    from resnest_train.models import create_model
    model = create_model("resnest14", num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images, targets = torch.randn(8, 3, 64, 64), torch.randint(0, 10, (8,))

    def step() -> float:
        started = time.perf_counter()
        torch.nn.functional.cross_entropy(model(images), targets).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started
    return step


def _background_save(state: dict, writer, step, times: dict) -> None:
    """submit, then training steps until the write is done. `lost`: the steps' time beyond what they take
    with no write in flight (the last step may run on a little after the write)."""
    from resnest_train.checkpoint.writer import snapshot
    usual = statistics.median(step() for _ in range(3))
    started = time.perf_counter()
    writer.submit(snapshot(state), is_best=True)
    times["background_blocked"].append(time.perf_counter() - started)
    during = []
    while writer.in_flight:
        during.append(step())
    writer.wait()
    times["background_write"].append(time.perf_counter() - started)
    times["step_no_write"].append(usual)
    times["step_during_write"].append(statistics.mean(during or [usual]))
    times["lost_to_the_write"].append(sum(during) - len(during) * usual)


def _one_round(state: dict, tmp: str, writer, step, round_: int, times: dict) -> None:
    from resnest_train.checkpoint import files as ckpt
    for kind in ("sync", "background") if round_ % 2 == 0 else ("background", "sync"):
        if kind == "background":
            _background_save({**state, "step": 2 * round_ + 2}, writer, step, times)
            continue
        started = time.perf_counter()
        ckpt.save_checkpoint({**state, "step": 2 * round_ + 1}, tmp, keep_last=3, is_best=True)
        times["sync_blocked"].append(time.perf_counter() - started)


def bench_checkpoint_blocking(args) -> dict:
    from resnest_train.checkpoint.writer import CheckpointWriter
    torch.set_num_threads(args.threads)
    state, step = _state(args.model), _training_step()
    step()  # warm-up: the first step allocates
    times: dict[str, list[float]] = {name: [] for name in (
        "sync_blocked", "background_blocked", "background_write", "step_no_write", "step_during_write",
        "lost_to_the_write")}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp, CheckpointWriter(tmp, keep_last=3) as writer:
        for round_ in range(args.rounds):
            _one_round(state, tmp, writer, step, round_, times)
        size = (Path(tmp) / "checkpoints" / "last.pt").stat().st_size
    medians = {name: statistics.median(values) for name, values in times.items()}
    result = {"model": args.model, "checkpoint_mb": round(size / 2**20, 1), "rounds": args.rounds,
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    result.update({f"{name}_ms": round(1000 * value, 1) for name, value in medians.items()})
    result["blocked_ratio"] = round(medians["sync_blocked"] / medians["background_blocked"], 1)
    result["step_slowdown_during_write"] = round(medians["step_during_write"] / medians["step_no_write"], 2)
    result.update(rank_state_bytes())
    return result
