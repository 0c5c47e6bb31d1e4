#!/usr/bin/env python
"""Data in a bucket, measured (BENCHMARKS.md, "Data in a bucket").

  benchmark_store.py cache [--shards 256] [--per-shard 50] [--batch 256] [--window 8] [--epochs 2]
      the node's shard cache (data/shard_cache.py, its own code) replaying the framework's order of each
      epoch, read step by step: bytes downloaded per epoch and hit rate, for data.shuffle global vs shards,
      at cache limits of 100%, 50% and 20% of the training shards, Belady's eviction vs LRU on the same
      order. The store is local sparse files (no bytes copied): what is counted is what a node would fetch.
  benchmark_store.py run --root DIR [--latency 0.1] [--bandwidth 50e6] [--rounds 2] [train.py overrides...]
      train.py on shards on local disk vs the same shards served over HTTP (scripts/shard_server.py, with a
      latency per request and a bandwidth cap) and from a local S3 server (moto's server mode), rounds
      interleaved: time to the first step (index cold, then cached) and images/s.
Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from resnest_train.data import store  # noqa: E402
from resnest_train.data.order import TrainOrder  # noqa: E402
from resnest_train.data.shard_cache import ShardCache  # noqa: E402
from resnest_train.recipe.schedule import BatchLayout  # noqa: E402

URL = "s3://bench/data"


def fake_store(folder: Path, shard_bytes: dict[str, int]) -> list[str]:
    """Shard objects as sparse files; store.info/download served from them; the list of downloads."""
    for unit, size in shard_bytes.items():
        (folder / unit).parent.mkdir(parents=True, exist_ok=True)
        with open(folder / unit, "wb") as file:
            file.truncate(size)
    downloads = []
    store.info = lambda url: {"ETag": "1", "size": (folder / url.removeprefix(URL + "/")).stat().st_size}
    store.download = lambda url, destination: downloads.append(url)  # the .part file has its size already
    return downloads


def replay(args, shuffle: str, limit_share: float, policy: str, work: Path) -> list[dict]:
    """Each epoch's downloads and hit rate for one (order, limit, policy)."""
    units = [f"train/s{i:04d}.tar" for i in range(args.shards)]
    rng = np.random.default_rng(0)
    sizes = {unit: int(rng.integers(90, 110)) * 10_000 for unit in units}  # shards of unequal size
    data = sum(sizes.values())
    stamps = {unit: store.stamp_of({"ETag": "1", "size": size}) for unit, size in sizes.items()}
    downloads = fake_store(work / "store", sizes)
    cache = ShardCache(URL, work / "cache", stamps, limit=int(limit_share * data), policy=policy)
    groups = torch.arange(args.shards).repeat_interleave(args.per_shard)
    num = len(groups)
    order = TrainOrder(0, num, BatchLayout(args.batch, args.batch, 1), num // args.batch, 0,
                       groups=groups if shuffle == "shards" else None, window=args.window)
    samples = type("Samples", (), {"dir_ids": groups.numpy(), "dirs": units})()
    cache.follow(samples, order)
    rows = []
    for epoch in range(args.epochs):
        cache.set_epoch(epoch, 0)
        before, hits, reads = len(downloads), 0, 0
        positions = order.epoch_order(epoch)[:order.steps_per_epoch * args.batch].numpy()
        for step in range(order.steps_per_epoch):
            cache.now = epoch * order.steps_per_epoch + step
            step_groups = groups.numpy()[positions[step * args.batch:(step + 1) * args.batch]]
            for unit in dict.fromkeys(units[g] for g in step_groups):
                reads += 1
                hits += cache._present(unit)
                cache.read(unit, 0, 1)
        fetched = sum(sizes[url.removeprefix(URL + "/")] for url in downloads[before:])
        rows.append({"shuffle": shuffle, "limit": limit_share, "policy": policy, "epoch": epoch + 1,
                     "downloaded_x_data": round(fetched / data, 3), "hit_rate": round(hits / reads, 3),
                     "peak_x_limit": round(cache.node_stats()["peak"] / (limit_share * data), 3)})
    shutil.rmtree(work)
    return rows


def cache_benchmark(args) -> list[dict]:
    rows = []
    for shuffle in ("global", "shards"):
        for limit in (1.0, 0.5, 0.2):
            for policy in ("belady", "lru"):
                rows += replay(args, shuffle, limit, policy, Path(tempfile.mkdtemp(prefix="store-bench-")))
                print(json.dumps(rows[-1]), flush=True)
    return rows


def timed_run(root: str, out: Path, home: Path, extra: list[str]) -> dict:
    """train.py for one epoch with an empty shard cache (`home`: where the index cache lives): seconds from
    launch to step 1's line, and the epoch's images/s."""
    command = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "demo.yaml"),
               f"output_dir={out}", f"data.root={root}", f"data.cache_dir={out / 'cache'}", *extra]
    started, first = time.monotonic(), None
    job = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env=dict(os.environ, HOME=str(home)))
    lines = []
    for line in job.stdout:
        lines.append(line)
        if first is None and re.search(r"step 1/\d+", line):
            first = time.monotonic() - started
    if job.wait() != 0:
        raise SystemExit("".join(lines[-20:]))
    rates = [float(m.group(1)) for line in lines for m in [re.search(r"([\d.]+) img/s", line)] if m]
    return {"first_step_s": round(first, 2), "img_per_s": round(float(np.median(rates[len(rates) // 2:])), 1)}


def moto_s3(folder: str) -> tuple[subprocess.Popen, str]:
    """A local S3 server (moto's server mode) holding `folder` as s3://bench-shards/data; AWS_* set here."""
    import boto3
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    time.sleep(3)
    client = boto3.client("s3")
    client.create_bucket(Bucket="bench-shards")
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            client.upload_file(str(path), "bench-shards", f"data/{path.relative_to(folder)}")
    return server, "s3://bench-shards/data"


def run_benchmark(args) -> list[dict]:
    server = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "shard_server.py"), args.root, "--latency",
                               str(args.latency), "--bandwidth", str(args.bandwidth)],
                              stdout=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{server.stdout.readline().split()[1]}"
    s3_server, s3_url = moto_s3(args.root)
    roots = {"disk": args.root, "http": url, "s3": s3_url}
    rows, homes = [], {name: Path(tempfile.mkdtemp(prefix=f"store-home-{name}-")) for name in roots}
    try:
        for round_ in range(args.rounds):  # round 0 indexes the shards, later rounds find the index cached
            for name, root in roots.items():
                out = Path(tempfile.mkdtemp(prefix=f"store-run-{name}-"))
                rows.append({"round": round_, "index": "cold" if round_ == 0 else "warm", "root": name,
                             **timed_run(root, out, homes[name], args.overrides)})
                shutil.rmtree(out)
                print(json.dumps(rows[-1]), flush=True)
    finally:
        server.terminate()
        s3_server.terminate()
        for home in homes.values():
            shutil.rmtree(home, ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    cache = sub.add_parser("cache")
    for name, default in (("shards", 256), ("per-shard", 50), ("batch", 256), ("window", 8), ("epochs", 2)):
        cache.add_argument(f"--{name}", type=int, default=default)
    run = sub.add_parser("run")
    run.add_argument("--root", required=True)
    run.add_argument("--latency", type=float, default=0.1)
    run.add_argument("--bandwidth", type=float, default=50e6)
    run.add_argument("--rounds", type=int, default=2)
    run.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    rows = cache_benchmark(args) if args.what == "cache" else run_benchmark(args)
    print(json.dumps({args.what: rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
