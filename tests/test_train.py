"""The trainer end to end: TensorBoard lr curve, config.yaml, one epoch on every backend, a dataset with bad
files, and DDP with two gloo processes (torchrun standalone and two c10d "nodes")."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from resnest_train.data.index import load_index
from tests.conftest import ROOT, TORCHRUN, free_port, make_order, metrics, run_script, script_env, train_args
from tests.test_data import dirty_root  # noqa: F401  (fixture)


@pytest.mark.slow
def test_tensorboard_lr_follows_warmup_then_cosine(tmp_path):
    run_script(train_args(None, tmp_path, "train.epochs=4", "schedule.warmup_epochs=1", "optim.lr=0.8"))
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    lrs = [e.value for e in events.Scalars("train/lr")]
    steps = [e.step for e in events.Scalars("train/lr")]
    peak = 0.8 * 8 / 256
    assert len(lrs) == 4 * 8 and steps == list(range(1, 33))
    assert lrs[0] == 0.0 and lrs[8] == pytest.approx(peak) and lrs[-1] == pytest.approx(0.0, abs=1e-9)
    assert lrs[4] == pytest.approx(peak / 2) and max(lrs) == pytest.approx(peak)
    assert len(events.Scalars("train/loss")) == 32 and len(events.Scalars("val/top1")) == 4
    assert events.Scalars("perf/images_per_sec") and events.Images("train/augmented_batch")
    # one x-axis, the global step: epoch-level scalars at the step that ends their epoch
    for tag in ("val/top1", "val/top5", "train/epoch_loss", "train/epoch"):
        assert [e.step for e in events.Scalars(tag)] == [8, 16, 24, 32], tag
    summary = events.Tensors("run/summary/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "global batch 8 = 1 processes x micro-batch 8 x 1 accumulation steps" in summary
    rows = metrics(tmp_path)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert {"train_loss", "val_top1", "val_top5", "lr", "images_per_sec", "world_size"} <= set(rows[0])
    text = (tmp_path / "config.yaml").read_text()
    assert "world_size 1" in text and f"lr {peak}" in text and "steps_per_epoch 8" in text
    assert yaml.safe_load(text)["output_dir"] == str(tmp_path)
    assert (tmp_path / "checkpoints" / "best.pt").is_file()


@pytest.mark.slow
def test_run_folder_config_continues_the_run(tmp_path):
    """config.yaml as written is a valid --config: the run it describes continues (here: is complete)."""
    run_script(train_args(None, tmp_path, "train.epochs=1"))
    again = run_script([train_args(None, tmp_path)[0], "--config", str(tmp_path / "config.yaml")])
    assert "already complete" in again.stdout
    more = run_script([train_args(None, tmp_path)[0], "--config", str(tmp_path / "config.yaml"), "train.epochs=2"])
    assert "resuming from" in more.stdout and [r["epoch"] for r in metrics(tmp_path)] == [1, 2]
    run_script([str(ROOT / "evaluate.py"), "--config", str(tmp_path / "config.yaml"), "--checkpoint",
                str(tmp_path / "checkpoints" / "last.pt"), "--output", str(tmp_path / "eval.json")])
    assert json.loads((tmp_path / "eval.json").read_text())["results"][0]["num_images"] == 16


@pytest.mark.slow
def test_channels_last_training_on_dali(image_root, tmp_path):
    run_script(train_args(image_root, tmp_path, "train.channels_last=true", "train.epochs=1"))
    assert metrics(tmp_path)[0]["val_images"] == 20


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["dali", "torchvision"])
def test_one_epoch_on_a_dataset_with_bad_files_names_them(backend, dirty_root, tmp_path):  # noqa: F811
    result = run_script(train_args(dirty_root, tmp_path, f"data.backend={backend}", "train.epochs=1"))
    assert "truncated.jpg" in result.stdout and "random.jpg" in result.stdout
    assert metrics(tmp_path)[0]["val_top1"] is not None


def broken_inside(image_root, tmp_path):
    """A copy of the dataset with one JPEG broken inside: valid header and end marker, garbage between
    (it passes the index's cheap check)."""
    root = tmp_path / "data"
    shutil.copytree(image_root, root)
    broken = root / "train" / "class_001" / "train_001_00003.jpg"
    data = bytearray(broken.read_bytes())
    data[400:1200] = bytes(800)
    broken.write_bytes(bytes(data))
    return root, broken


@pytest.mark.slow
def test_image_broken_inside_is_skipped_and_named_by_torchvision(image_root, tmp_path):
    root, broken = broken_inside(image_root, tmp_path)
    result = run_script(train_args(root, tmp_path / "run", "data.backend=torchvision", "train.epochs=1"))
    assert str(broken) in result.stdout


@pytest.mark.slow
def test_image_broken_inside_stops_dali_naming_it(image_root, tmp_path):
    root, broken = broken_inside(image_root, tmp_path)
    result = run_script(train_args(root, tmp_path / "run", "train.epochs=1"), expect=2)
    assert f"error: cannot decode {broken} (cannot decode" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.dali
def test_image_broken_inside_stops_every_process_at_once(image_root, tmp_path):
    """Two processes (no launcher to kill the other one): the one whose decoder fails names the image, the
    other, waiting for it in a collective, stops with the same line within seconds, not at the process
    group's 30-minute timeout."""
    root, broken = broken_inside(image_root, tmp_path)
    port = str(free_port())
    started = time.time()
    workers = [subprocess.Popen(
        [sys.executable, *train_args(root, tmp_path / "run", "train.epochs=1")], cwd=ROOT, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=script_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=port)) for rank in range(2)]
    outputs = [worker.communicate(timeout=120) for worker in workers]
    assert time.time() - started < 60, outputs
    errors = []
    for worker, (_, stderr) in zip(workers, outputs):
        assert worker.returncode == 2 and "Traceback" not in stderr, stderr[-3000:]
        errors.append([line for line in stderr.splitlines() if line.startswith("error: ")])
    assert errors[0] == errors[1] and len(errors[0]) == 1, errors  # (DALI's own log line aside)
    assert errors[0][0].startswith(f"error: cannot decode {broken} (")


def sampled_epochs(record: Path) -> set[int]:
    """The epochs a run trained, from its sample record (RESNEST_TRAIN_SAMPLE_LOG)."""
    rows = [json.loads(line) for path in record.glob("rank*.jsonl") for line in path.read_text().splitlines()]
    return {row["epoch"] for row in rows}


@pytest.mark.slow
def test_an_undecodable_validation_image_loses_no_training(image_root, tmp_path):
    """The first evaluation meets a validation image DALI cannot decode (the last of the list: the loader's
    first batches decode when it is built): the run stops with one line, but the epoch's checkpoint is
    already written. A rerun leaves the recorded image out, evaluates that epoch (also when it is the last:
    not "already complete") without training it again, and a longer run continues from it."""
    root = tmp_path / "data"
    shutil.copytree(image_root, root)
    broken = root / "val" / "class_003" / "val_003_00004.jpg"
    data = bytearray(broken.read_bytes())
    data[400:1200] = bytes(800)
    broken.write_bytes(bytes(data))
    out, records = tmp_path / "run", [tmp_path / "evaluate", tmp_path / "continue"]
    failed = run_script(train_args(root, out, "train.epochs=1"), expect=2)
    assert f"error: cannot decode {broken} (" in failed.stderr and "Traceback" not in failed.stderr
    state = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert (state["epoch"], state["batch"], state["step"]) == (1, 0, 6) and not (out / "metrics.jsonl").exists()
    for record, epochs in zip(records, (1, 2)):
        record.mkdir()
        result = run_script(train_args(root, out, f"train.epochs={epochs}"),
                            env=script_env(RESNEST_TRAIN_SAMPLE_LOG=str(record)))
        assert "already complete" not in result.stdout
    assert sampled_epochs(records[0]) == set() and sampled_epochs(records[1]) == {1}  # epoch 0 trained once
    rows = metrics(out)
    assert [(r["epoch"], r["step"], r["val_images"]) for r in rows] == [(1, 6, 19), (2, 12, 19)]
    assert rows[0]["train_loss"] == pytest.approx(state["epoch_metrics"]["train_loss"])
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["epoch_metrics"] is None


@pytest.mark.slow
@pytest.mark.dist
def test_two_gloo_processes_train_one_run(image_root, tmp_path):
    result = run_script(train_args(image_root, tmp_path, "train.epochs=2", "model.sync_bn=true"),
                        launcher=[*TORCHRUN, "--standalone", "--nproc-per-node=2"])
    assert "model.sync_bn=true has no effect on CPU" in result.stdout
    rows = metrics(tmp_path)
    assert [r["world_size"] for r in rows] == [2, 2] and rows[-1]["val_images"] == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "checkpoints", "config.yaml", "metrics.jsonl",
                                                           "tb"]
    # The run evaluated the model it saved: rank 0's BN statistics on both ranks, as in last.pt.
    run_script([str(ROOT / "evaluate.py"), "--config", str(tmp_path / "config.yaml"), "--checkpoint",
                str(tmp_path / "checkpoints" / "last.pt"), "--output", str(tmp_path / "eval.json")])
    result = json.loads((tmp_path / "eval.json").read_text())["results"][0]
    assert (result["top1"], result["top5"]) == (rows[-1]["val_top1"], rows[-1]["val_top5"])


@pytest.mark.slow
@pytest.mark.dist
def test_two_nodes_with_c10d_rendezvous(image_root, tmp_path):
    launcher = [*TORCHRUN, "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=test", "--rdzv-conf=join_timeout=60"]
    cmd = [*launcher, *train_args(image_root, tmp_path, "train.epochs=1")]
    nodes = [subprocess.Popen(cmd, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(outputs)[-4000:]
    assert metrics(tmp_path)[0]["world_size"] == 2


def test_train_device_cuda_without_cuda_is_one_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the error path needs a machine without it")
    result = run_script(train_args(None, tmp_path, "train.device=cuda"), expect=2)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: train.device=cuda but CUDA is not usable")


def break_micro_batch(image_root, tmp_path, *, global_batch: int) -> tuple[Path, list[str]]:
    """A copy of the dataset where every image of epoch 0's step 0, micro-batch 1 (micro-batches of 8) is
    broken inside (valid header and end marker: the index keeps them)."""
    root = tmp_path / "data"
    shutil.copytree(image_root, root)
    train = load_index(root).train
    order = make_order(len(train), 8, global_batch=global_batch)
    broken = [str(root / train[p][0]) for p in order.rank_samples(0)[8:16].tolist()]
    for path in broken:
        data = bytearray(Path(path).read_bytes())
        data[300:-2] = bytes(len(data) - 302)
        Path(path).write_bytes(bytes(data))
    return root, broken


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_an_undecodable_micro_batch_keeps_every_step(image_root, tmp_path, processes):
    """Every image of one micro-batch undecodable (torchvision): each is replaced by the next decodable
    image of the training list, so every rank trains all its micro-batches, the run ends at its last step,
    and every file is named in the log."""
    root, broken = break_micro_batch(image_root, tmp_path, global_batch=16)
    launcher = None if processes == 1 else [*TORCHRUN, "--standalone", f"--nproc-per-node={processes}"]
    extra = ["data.backend=torchvision", "train.epochs=2", "train.global_batch=16"]
    result = run_script(train_args(root, tmp_path / "run", *extra), launcher=launcher)
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert state["step"] == 2 * 48 // 16 and [row["epoch"] for row in metrics(tmp_path / "run")] == [1, 2]
    named = result.stdout + result.stderr
    assert all(f"undecodable training image {path}" in named for path in broken)
    recorded = (tmp_path / "run" / "undecodable.txt").read_text()
    assert all(str(Path(path).relative_to(root)) in recorded for path in broken), recorded


@pytest.mark.slow
@pytest.mark.dali
def test_a_bad_image_is_recorded_and_never_replayed_by_max_restarts(image_root, tmp_path):
    """The README's `torchrun --max-restarts=3` with an image DALI cannot decode: torchrun ran the same failing
    decode 4 times. The failure records the file in the run folder; the restart names it at start, replaces
    it by the next image of the training list and finishes the run."""
    root, broken = broken_inside(image_root, tmp_path)
    out = tmp_path / "run"
    result = run_script(train_args(root, out, "train.epochs=2"),
                        launcher=[*TORCHRUN, "--standalone", "--nproc-per-node=1", "--max-restarts=3"])
    said = result.stdout + result.stderr
    assert said.count(f"error: cannot decode {broken} (") == 1, said[-3000:]
    assert "train/class_001/train_001_00003.jpg" in (out / "undecodable.txt").read_text()
    assert "1 images recorded as undecodable" in said and [row["epoch"] for row in metrics(out)] == [1, 2]
