"""Training and evaluation from an object store (S3 on a local moto server, HTTP from scripts/shard_server.py)
give the weights and top-1 of the same shards on disk, on 1 and 2 processes and both backends; a run stopped
mid-epoch continues on another process count, each image once, whatever the cache holds; each store
failure in a run is one line on every rank, recorded nowhere as undecodable, and a rerun continues."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, assert_one_error_everywhere, launch_ranks, run_script, script_env, train_args
from tests.servers import http_store, s3_store, upload
from tests.test_process_count import args, epoch_use, launcher, recorded, root, stop_mid_epoch  # noqa: F401
from tests.test_shards import pack

pytestmark = pytest.mark.slow
ONE_EPOCH = ("train.epochs=1", "data.prefetch_shards=2")


@pytest.fixture(scope="module")
def packed(root, tmp_path_factory) -> Path:  # noqa: F811 - test_process_count's 96 images
    out = tmp_path_factory.mktemp("packed96")
    assert pack(root, out, "--shard-size", "20000").returncode == 0
    return out


@pytest.fixture(scope="module")
def stores(packed, tmp_path_factory):
    """{"s3": (root URL, environment), "http": (root URL, environment)}, serving `packed` for the module."""
    home = tmp_path_factory.mktemp("home")  # the remote index caches (~/.cache)
    with s3_store() as env, http_store(packed, tmp_path_factory.mktemp("http")) as server:
        s3_root = upload(env, packed, "bucket-train/imagenet")
        yield {"disk": (str(packed), {"HOME": str(home)}), "s3": (s3_root, {**env, "HOME": str(home)}),
               "http": (server.url, {"HOME": str(home)})}


def train(store: tuple[str, dict], out: Path, backend: str, processes: int, *extra: str) -> Path:
    url, env = store
    record = out / "samples"
    record.mkdir(parents=True)
    run_script(args(url, out, backend, *ONE_EPOCH, f"data.cache_dir={out / 'cache'}", *extra),
               launcher=launcher(processes), env=script_env(RESNEST_TRAIN_SAMPLE_LOG=str(record), **env))
    return out


def evaluate(store: tuple[str, dict], checkpoint: Path, out: Path, backend: str) -> dict:
    url, env = store
    run_script([str(ROOT / "evaluate.py"), "--config", str(ROOT / "configs" / "demo.yaml"), "--checkpoint",
                str(checkpoint), "--output", str(out), f"data.root={url}", "model.num_classes=4",
                "model.name=resnest14", f"data.backend={backend}", "data.workers=1", "--crop-size", "32",
                f"data.cache_dir={out.parent / 'eval-cache'}"], env=script_env(**env))
    return json.loads(out.read_text())["results"][0]


def weights(out: Path) -> dict:
    return torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["model"]


@pytest.mark.dist
@pytest.mark.parametrize("backend", ["torchvision", "dali"])
def test_a_store_trains_and_evaluates_as_the_same_shards_on_disk(stores, tmp_path, backend):
    for processes in (1, 2):
        runs = {name: train(store, tmp_path / f"{name}{processes}", backend, processes)
                for name, store in stores.items()}
        disk = weights(runs["disk"])
        for name in ("s3", "http"):
            assert recorded(runs[name] / "samples") == recorded(runs["disk"] / "samples")
            assert [k for k, v in weights(runs[name]).items() if not torch.equal(v, disk[k])] == [], name
    checkpoint = tmp_path / "disk1" / "checkpoints" / "last.pt"
    scores = {name: evaluate(store, checkpoint, tmp_path / f"{name}.json", backend) for name, store in stores.items()}
    assert scores["s3"]["top1"] == scores["http"]["top1"] == scores["disk"]["top1"]
    assert scores["s3"]["num_images"] == scores["disk"]["num_images"] == 8


@pytest.mark.dist
@pytest.mark.parametrize("cache", ["half-filled", "wiped"])
def test_stopped_mid_epoch_continues_on_another_process_count(stores, packed, tmp_path, cache):
    url, env = stores["s3"]
    data = sum(path.stat().st_size for path in (packed / "train").glob("*.tar"))
    record = tmp_path / "samples"
    record.mkdir()
    run_env = script_env(RESNEST_TRAIN_SAMPLE_LOG=str(record), **env)
    extra = ("checkpoint.interval_steps=1", f"data.cache_dir={tmp_path / 'cache'}", f"data.cache_limit={data // 2}")
    stop_mid_epoch([*launcher(2), *args(url, tmp_path, "torchvision", *extra)], run_env)
    state = torch.load(tmp_path / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 0 and state["batch"] == 1 and state["world_size"] == 2
    held = sum(path.stat().st_size for path in (tmp_path / "cache").rglob("*.tar"))
    assert 0 < held <= data // 2
    if cache == "wiped":
        shutil.rmtree(tmp_path / "cache")
    result = run_script(args(url, tmp_path, "torchvision", *extra), env=run_env)
    assert "resuming a run of world size 2 (global batch 32) with world size 1" in result.stdout
    for epoch in (0, 1):  # every image of each epoch once, across the stop
        use = epoch_use(recorded(record), epoch)
        assert set(use.values()) == {1} and len(use) == 96


def start_then(command: list[str], env: dict, marker: str, action) -> subprocess.CompletedProcess:
    """Run `command`; call `action()` once a line holding `marker` is printed; the finished process."""
    job = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in job.stdout:
        lines.append(line)
        if marker in line:
            action()
            break
    output = "".join(lines) + job.communicate(timeout=300)[0]
    return subprocess.CompletedProcess(command, job.returncode, output, "")


def assert_one_line(result: subprocess.CompletedProcess, out: Path, words: str) -> None:
    errors = [line for line in result.stdout.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2 and "Traceback" not in result.stdout, result.stdout[-3000:]
    assert len(errors) == 1 and words in errors[0], errors
    assert not (out / "undecodable.txt").exists()


@pytest.mark.parametrize("failure", ["403", "missing", "changed", "throttled"])
def test_a_store_failure_mid_run_is_one_line_and_a_rerun_continues(packed, tmp_path, failure):
    data = tmp_path / "data"
    shutil.copytree(packed, data)
    shards = sorted((data / "train").glob("*.tar"))
    with http_store(data, tmp_path / "server") as server:
        command = train_args(server.url, tmp_path / "run", "data.backend=torchvision", "data.prefetch_shards=0",
                             f"data.cache_dir={tmp_path / 'cache'}", "train.epochs=1")
        env = script_env(HOME=str(tmp_path / "home"))
        moved = tmp_path / "moved.tar"
        actions = {"403": lambda: server.inject(403, 10_000, match="/train/", method="GET"),
                   "missing": lambda: [shutil.move(path, moved) for path in shards[-1:]],
                   "changed": lambda: [os.utime(path, ns=(1, 1)) for path in shards],
                   "throttled": lambda: server.inject(503, 2, match="/train/", method="GET")}
        result = start_then([sys.executable, *command], env, "run summary:", actions[failure])
        if failure == "throttled":  # tried again after a pause, and served
            assert result.returncode == 0 and server.remaining() == 0, result.stdout[-3000:]
            return
        words = {"403": "access denied (HTTP 403)", "missing": "no such object",
                 "changed": "changed since the dataset was indexed"}[failure]
        assert_one_line(result, tmp_path / "run", words)
        server.inject(403, 0)
        if moved.exists():
            shutil.move(moved, shards[-1])
        run_script(command, env=env)  # the same command continues (a changed shard is indexed again)


@pytest.mark.dist
def test_an_unreachable_store_mid_run_is_one_line_on_every_rank(packed, tmp_path):
    with http_store(packed, tmp_path / "server") as server:
        command = train_args(server.url, tmp_path / "run", "data.backend=torchvision", "data.prefetch_shards=0",
                             f"data.cache_dir={tmp_path / 'cache'}", "train.epochs=1")
        env = {"HOME": str(tmp_path / "home")}
        run_script(["-m", "resnest_train.data.index", server.url], env=script_env(**env))  # the index, warm
    results = launch_ranks(command, **env)  # the server is gone
    line = assert_one_error_everywhere(results, "cannot read http://127.0.0.1")
    assert "unreachable" in line and not (tmp_path / "run" / "undecodable.txt").exists()


def test_a_cache_of_a_fifth_of_the_data_in_shard_order_stays_within_it(tmp_path):
    """data.cache_limit at 20% of the data, data.shuffle=shards: the cache never holds more than its limit
    (polled, and its own record of the most it held), and each epoch downloads at most 1.2x the data
    (the server's count of the bytes it sent: training and validation shards). 384 training images in 64
    shards: what the reader holds at once (a step, the DataLoader's two batches ahead, the shards fetched
    ahead) is a few percent of the data, as at ImageNet's size, not a quarter of it."""
    images, data = tmp_path / "images", tmp_path / "data"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_synthetic_dataset.py"), "--out", str(images),
                    "--classes", "4", "--train-per-class", "96", "--val-per-class", "2", "--size", "40"],
                   check=True, capture_output=True)
    assert pack(images, data, "--shard-size", "20000", "--shuffle", "1").returncode == 0
    data_bytes = sum(path.stat().st_size for path in data.rglob("*.tar"))
    limit = data_bytes // 5
    cache = tmp_path / "cache"
    most, done = [0], threading.Event()

    def poll() -> None:
        while not done.is_set():
            # by inode: a .part file renamed while the folder is listed is seen under both names
            files = {}
            for path in cache.rglob("*.tar*"):
                try:
                    stat = path.stat()
                except FileNotFoundError:  # evicted while listed
                    continue
                files[stat.st_ino] = stat.st_size
            most[0] = max(most[0], sum(files.values()))
            time.sleep(0.005)
    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    with http_store(data, tmp_path / "server") as server:
        env = script_env(HOME=str(tmp_path / "home"))
        run_script(["-m", "resnest_train.data.index", server.url], env=env)  # the index's ranges: not an epoch's
        sent = [server.sent(".tar")]
        for epochs in (1, 2):  # one epoch per run: the server's count per epoch
            run_script(train_args(server.url, tmp_path / "run", "data.backend=torchvision", "data.shuffle=shards",
                                  "data.shuffle_window=1", f"data.cache_limit={limit}", f"data.cache_dir={cache}",
                                  f"train.epochs={epochs}"), env=env)
            sent.append(server.sent(".tar") - sum(sent))
    sent = sent[1:]
    done.set()
    watcher.join()
    peak = json.loads(next(cache.glob("*/.locks/stats.json")).read_text())["peak"]
    assert 0 < most[0] <= limit and 0 < peak <= limit
    assert all(data_bytes * 0.5 < epoch <= 1.2 * data_bytes for epoch in sent), (sent, data_bytes)
