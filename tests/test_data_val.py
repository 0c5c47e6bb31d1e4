"""Validation loaders (data/loaders.py `build_val_loader`) at their edges: a rank whose shard is empty gets
an empty loader on every backend (iterates nothing, closes), also through `evaluate.py` on two processes with
one validation image."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from resnest_train.data import build_val_loader
from resnest_train.data.index import load_index
from tests.conftest import ROOT, TORCHRUN, make_plan, run_script, train_args


@pytest.mark.parametrize("backend", ["torchvision", pytest.param("dali", marks=pytest.mark.dali)])
def test_an_empty_validation_shard_is_an_empty_loader(image_root, backend):
    index = load_index(image_root)
    plan = make_plan(image_root, rank=1, world_size=2, backend=backend)
    loader = build_val_loader(plan, index, batch_size=4, undecodable=np.arange(len(index.val)))
    assert len(loader) == 0 and list(loader) == [] and loader.delivered == []
    loader.close()


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.dali
def test_two_processes_with_one_validation_image_train_and_evaluate(image_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(image_root, root)
    for path in sorted((root / "val").rglob("*.jpg"))[1:]:
        path.unlink()
    out = tmp_path / "run"
    launcher = [*TORCHRUN, "--standalone", "--nproc-per-node=2"]
    run_script(train_args(root, out, "data.backend=dali", "train.epochs=1", "train.global_batch=16"),
               launcher=launcher)
    result = run_script([str(ROOT / "evaluate.py"), "--config", str(out / "config.yaml"), "--checkpoint",
                         str(out / "checkpoints" / "last.pt"), "--crop-size", "32"], launcher=launcher)
    row = next(line.split() for line in result.stdout.splitlines() if line.split()[:1] == ["32"])
    assert row[4] == "1", result.stdout  # crop, resize, top-1, top-5, images: the one image counted once
