"""The ImageNet-scale benchmark of scripts/benchmark.py: what the data path costs at 1.33M files.

  benchmark.py scale --out DIR [--train 1281000] [--val 50000] [--classes 1000] [--skip-shards]
      builds DIR/folder (train/ and val/ class folders of hard links to 64 tiny JPEGs: no disk space, as
      ImageNet's file count) and DIR/shards (scripts/pack_dataset.py of it), then reports, each step in a
      fresh process: the index opened cold (no cache) and warm, with peak memory; the bytes each rank
      receives and the index's memory per rank; the per-epoch set-up of one rank of 8 (its part of the
      epoch's order); the files opened per 1,000 training images read, folder vs shards; and the seconds
      from `torchrun` (2 processes, torchvision backend, a tiny model) to the first optimizer step.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_STEP = """import json, os, resource, sys, time
sys.path.insert(0, {root!r})
from resnest_train.data.index import load_index, index_to_bytes, index_from_bytes
from resnest_train.data.sample_read import read_sample
def peak_mb():
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return own / 1024
if __name__ == "__main__":
    base = peak_mb()  # the interpreter, numpy and torch (imported by the package) before the index
    started = time.perf_counter()
    index = load_index(sys.argv[1])
    out = {{"seconds": time.perf_counter() - started, "peak_rss_mb": peak_mb(), "index_peak_mb": peak_mb() - base,
           "train": len(index.train), "val": len(index.val)}}
    if sys.argv[2] == "full":
        started = time.perf_counter()
        buffer = index_to_bytes(index)
        out["pack_seconds"] = time.perf_counter() - started
        started = time.perf_counter()
        received = index_from_bytes(buffer)
        out["unpack_seconds"] = time.perf_counter() - started
        out["bytes_each_rank_receives"] = len(buffer)
        out["index_mb_per_rank"] = (received.train.nbytes() + received.val.nbytes()) / 2**20
        from resnest_train.data.order import TrainOrder
        from resnest_train.recipe.schedule import BatchLayout
        order = TrainOrder(0, len(index.train), BatchLayout(1024, 128, 8), len(index.train) // 1024, 0)
        started = time.perf_counter()
        order.rank_samples(1).view(-1, 128)
        out["epoch_setup_seconds"] = time.perf_counter() - started
        import torch
        from resnest_train.data.dali_train import build_dali_train
        from resnest_train.data.plan import DataPlan
        plan = DataPlan(backend="dali", root=index.root, rank=0, world_size=8, device=torch.device("cpu"),
                        decoder="cpu", channels_last=False, workers=2, seed=0, num_classes=1000, synthetic_size=0,
                        crop_size=32, rrc_scale=(0.08, 1.0), hflip=True, autoaugment="imagenet",
                        autoaugment_on="crop", color_jitter=0.4, lighting=0.1, interpolation="bilinear",
                        val_crop_size=32, val_resize_size=37)
        started = time.perf_counter()
        loader = build_dali_train(plan, index.train, order)
        loader.set_epoch(0)
        next(iter(loader))
        out["dali_build_seconds"] = time.perf_counter() - started
        started = time.perf_counter()
        loader.set_epoch(1)
        out["dali_epoch_setup_seconds"] = time.perf_counter() - started
        opened = [0]
        real_open = os.open
        def counting_open(*args, **kwargs):
            opened[0] += 1
            return real_open(*args, **kwargs)
        os.open = counting_open
        import builtins
        real_builtin = builtins.open
        def counting_builtin(*args, **kwargs):
            opened[0] += 1
            return real_builtin(*args, **kwargs)
        builtins.open = counting_builtin
        for i in order.rank_samples(0)[:1000].tolist():
            read_sample(index.root, index.train, i)
        out["opens_per_1000_images"] = opened[0]
    print(json.dumps(out))
"""


def make_folder(out: Path, train: int, val: int, classes: int) -> None:
    """Hard links to 64 tiny JPEGs, named like ImageNet's files."""
    from PIL import Image
    sources = []
    for i in range(64):
        path = out / "sources" / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        Image.new("RGB", (16 + i % 8, 16 + i // 8), (4 * i, 120, 200)).save(buffer, format="JPEG")
        path.write_bytes(buffer.getvalue())
        sources.append(str(path))
    for split, count in (("train", train), ("val", val)):
        for label in range(classes):
            name = f"n{label:08d}"
            folder = out / "folder" / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count // classes + (label < count % classes)):
                os.link(sources[(label + i) % 64], folder / f"{name}_{i}.JPEG")


def _step(root: Path, mode: str) -> dict:
    script = _STEP.format(root=str(ROOT))
    result = subprocess.run([sys.executable, "-c", script, str(root), mode], capture_output=True, text=True,
                            cwd=ROOT)
    if result.returncode:
        raise SystemExit(result.stderr[-2000:])
    return json.loads(result.stdout.splitlines()[-1])


def _drop_caches(root: Path) -> None:
    for cache in root.glob(".resnest_index*"):
        cache.unlink()


def launch_to_first_step(root: Path, backend: str, processes: int = 2) -> float:
    """Seconds from `torchrun` to the first optimizer step's log line of a tiny model on `root` (the index
    warm: what a requeue or an elastic restart pays), then the run is stopped."""
    out = Path(tempfile.mkdtemp(prefix="scale-run-"))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "demo.yaml"), f"output_dir={out}",
               f"data.root={root}", f"data.backend={backend}", "model.num_classes=1000", "data.crop_size=32",
               "data.val_crop_size=32", "data.workers=1", "train.batch_size=8", "train.log_interval=1"]
    started = time.perf_counter()
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                           env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True)
    try:
        for line in job.stdout:
            if " step 1/" in line:
                return time.perf_counter() - started
        raise SystemExit(f"the run ended before its first step (exit {job.wait()})")
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
        shutil.rmtree(out, ignore_errors=True)


def bench_scale(args) -> dict:
    out = Path(args.out)
    if not (out / "folder").is_dir():
        started = time.perf_counter()
        make_folder(out, args.train, args.val, args.classes)
        print(f"made {args.train + args.val} hard links in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    results = {}
    layouts = ["folder"] if args.skip_shards else ["folder", "shards"]
    if "shards" in layouts and not (out / "shards" / "classes.txt").is_file():
        started = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / "scripts" / "pack_dataset.py"), "--root", str(out / "folder"),
                        "--out", str(out / "shards")], check=True, capture_output=True)
        results["pack_seconds"] = time.perf_counter() - started
    for layout in layouts:
        root = out / layout
        _drop_caches(root)
        cold = _step(root, "open")
        warm = _step(root, "full")
        results[layout] = {"cold_seconds": cold["seconds"], "cold_peak_rss_mb": cold["peak_rss_mb"],
                           "cold_index_peak_mb": cold["index_peak_mb"], "warm_seconds": warm["seconds"],
                           "warm_peak_rss_mb": warm["peak_rss_mb"], "warm_index_peak_mb": warm["index_peak_mb"],
                           **{k: v for k, v in warm.items() if k not in ("seconds", "peak_rss_mb", "index_peak_mb")}}
        if not args.skip_launch:
            results[layout]["launch_to_first_step_seconds"] = launch_to_first_step(root, "torchvision")
        print(json.dumps({layout: results[layout]}), file=sys.stderr)
    return results


def add_parsers(sub) -> None:
    scale = sub.add_parser("scale")
    scale.add_argument("--out", required=True)
    scale.add_argument("--train", type=int, default=1_281_000)
    scale.add_argument("--val", type=int, default=50_000)
    scale.add_argument("--classes", type=int, default=1000)
    scale.add_argument("--skip-shards", action="store_true")
    scale.add_argument("--skip-launch", action="store_true", help="no torchrun launch-to-first-step timing")
