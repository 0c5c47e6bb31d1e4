"""The trainer: recipe pieces (param groups, mixup targets, schedule), TensorBoard lr curve, one epoch on
every backend, a dataset with bad files, and DDP with two gloo processes (torchrun)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from resnest_train.config import load_config
from resnest_train.models import create_model
from resnest_train.optim import param_groups
from resnest_train.recipe import build_mixup
from resnest_train.schedule import learning_rate
from tests.conftest import ROOT
from tests.test_data import dirty_root  # noqa: F401  (fixture)


def test_param_groups_exempt_every_bias_and_norm_parameter():
    model = create_model("resnest50")
    decay, no_decay = param_groups(model, 1e-4)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    no_decay_ids = {id(p) for p in no_decay["params"]}
    names = {name for name, p in model.named_parameters() if id(p) in no_decay_ids}
    # the deep-stem and downsample BNs that the official port's `'bn' in name` filter missed
    assert {"conv1.1.weight", "conv1.4.bias", "layer2.0.downsample.2.weight", "fc.bias"} <= names
    for name, param in model.named_parameters():
        assert (id(param) in no_decay_ids) == (param.ndim <= 1 or name.endswith(".bias")), name


def test_mixup_with_label_smoothing_targets():
    config = load_config(ROOT / "configs" / "resnest50.yaml", ["model.num_classes=5"])
    mixup = build_mixup(config)
    np.random.seed(0)
    images = torch.randn(4, 3, 8, 8)
    targets = torch.tensor([0, 1, 2, 3])
    mixed_images, soft = mixup(images.clone(), targets)
    assert torch.allclose(soft.sum(dim=1), torch.ones(4))
    # recover lambda from the images, then check the recipe's formula: smoothing applied once, then mixed
    lam = ((mixed_images - images.flip(0)) / (images - images.flip(0))).median().item()
    smooth = lambda y: torch.nn.functional.one_hot(y, 5) * (1 - 0.1) + 0.1 / 5  # noqa: E731
    expected = lam * smooth(targets) + (1 - lam) * smooth(targets.flip(0))
    assert torch.allclose(soft, expected, atol=1e-5)


def test_schedule_endpoints():
    kw = dict(total_steps=100, warmup_steps=10, peak_lr=0.4, min_lr=0.0)
    assert learning_rate(0, **kw) == 0.0
    assert learning_rate(5, **kw) == pytest.approx(0.2)
    assert learning_rate(10, **kw) == pytest.approx(0.4)
    assert learning_rate(99, **kw) == pytest.approx(0.0, abs=1e-12)
    values = [learning_rate(s, **kw) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def train_cmd(out: Path, *extra: str, launcher: list[str] | None = None) -> list[str]:
    return [*(launcher or [sys.executable]), str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "demo.yaml"),
            f"output_dir={out}", "model.num_classes=4", "data.crop_size=32", "data.val_crop_size=32",
            "data.workers=1", "train.batch_size=8", "train.log_interval=2", *extra]


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, env=env, **kwargs)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_lr_follows_warmup_then_cosine(tmp_path):
    run(train_cmd(tmp_path, "data.backend=synthetic", "data.synthetic_size=64", "train.epochs=4",
                  "schedule.warmup_epochs=1", "optim.lr=0.8"))
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    lrs = [e.value for e in events.Scalars("train/lr")]
    steps = [e.step for e in events.Scalars("train/lr")]
    peak = 0.8 * 8 / 256
    assert len(lrs) == 4 * 8 and steps == list(range(1, 33))
    assert lrs[0] == 0.0 and lrs[8] == pytest.approx(peak) and lrs[-1] == pytest.approx(0.0, abs=1e-9)
    assert lrs[4] == pytest.approx(peak / 2) and max(lrs) == pytest.approx(peak)
    assert len(events.Scalars("train/loss")) == 32 and len(events.Scalars("val/top1")) == 4
    assert events.Scalars("perf/images_per_sec")
    rows = metrics(tmp_path)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert {"train_loss", "val_top1", "val_top5", "lr", "images_per_sec", "world_size"} <= set(rows[0])
    config = (tmp_path / "config.yaml").read_text()
    assert "world_size: 1" in config and f"lr: {peak}" in config
    assert (tmp_path / "checkpoints" / "best.pt").is_file()


@pytest.mark.slow
def test_channels_last_training_on_dali(image_root, tmp_path):
    run(train_cmd(tmp_path, f"data.root={image_root}", "train.channels_last=true", "train.epochs=1"))
    assert metrics(tmp_path)[0]["val_images"] == 20


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["dali", "torchvision"])
def test_one_epoch_on_a_dataset_with_bad_files_names_them(backend, dirty_root, tmp_path):  # noqa: F811
    result = run(train_cmd(tmp_path, f"data.root={dirty_root}", f"data.backend={backend}", "train.epochs=1"))
    assert "truncated.jpg" in result.stdout and "random.jpg" in result.stdout
    assert metrics(tmp_path)[0]["val_top1"] is not None


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["dali", "torchvision"])
def test_image_broken_inside_is_named(backend, image_root, tmp_path):
    """Valid JPEG header and end marker, garbage inside: passes the index's cheap check."""
    root = tmp_path / "data"
    shutil.copytree(image_root, root)
    broken = root / "train" / "class_001" / "train_001_00003.jpg"
    data = bytearray(broken.read_bytes())
    data[400:1200] = bytes(800)
    broken.write_bytes(bytes(data))
    cmd = train_cmd(tmp_path / "run", f"data.root={root}", f"data.backend={backend}", "train.epochs=1")
    if backend == "torchvision":
        assert str(broken) in run(cmd).stdout  # skipped and named
        return
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"error: cannot decode {broken}; remove it" in result.stderr and "Traceback" not in result.stderr


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.dist
def test_two_gloo_processes_train_one_run(image_root, tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    result = run(train_cmd(tmp_path, f"data.root={image_root}", "train.epochs=2", "model.sync_bn=true",
                           launcher=launcher))
    assert "model.sync_bn=true has no effect on CPU" in result.stdout
    rows = metrics(tmp_path)
    assert [r["world_size"] for r in rows] == [2, 2] and rows[-1]["val_images"] == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "config.yaml", "metrics.jsonl", "tb"]


@pytest.mark.slow
@pytest.mark.dist
def test_two_nodes_with_c10d_rendezvous(image_root, tmp_path):
    port = free_port()
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=test",
                "--rdzv-conf=join_timeout=60"]
    cmd = train_cmd(tmp_path, f"data.root={image_root}", "train.epochs=1", launcher=launcher)
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    nodes = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(outputs)[-4000:]
    assert metrics(tmp_path)[0]["world_size"] == 2
