"""Nothing lost: kill -9 after a mid-epoch checkpoint, SIGTERM, corrupt checkpoints; resumed runs end
bit-identical to uninterrupted ones (CPU, train.deterministic=true, DALI backend); an epoch is finished in the
order it was dealt (data.shuffle)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, TORCHRUN, metrics, run_script, script_env, train_args
from tests.test_faults import one_line_error
from tests.test_shards import pack

pytestmark = pytest.mark.slow


def tiny_args(root: Path, out: Path, *extra: str) -> list[str]:
    return train_args(root, out, "train.epochs=2", "train.deterministic=true", "checkpoint.keep_last=5",
                      "schedule.warmup_epochs=0.5", *extra)


def run_train(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return run_script(args, expect=None, **kwargs)


def final_weights(out: Path) -> dict:
    return torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["model"]


def assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert different == []


@pytest.fixture(scope="module")
def reference_run(image_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    result = run_train(tiny_args(image_root, out))
    assert result.returncode == 0, result.stdout + result.stderr
    return out


@pytest.fixture(scope="module")
def reference(reference_run) -> dict:
    return final_weights(reference_run)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None, "training ended before the expected checkpoint"
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def kill_after_step_2_and_resume(args: list[str], out: Path) -> None:
    """The run of `args` killed (-9) once its step-2 checkpoint exists, mid-epoch, then run again to its end."""
    process = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=script_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    wait_for(out / "checkpoints" / "step-000000002.pt", process)
    process.kill()
    process.wait()
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert state["batch"] > 0  # a mid-epoch checkpoint, not an epoch boundary
    result = run_train(args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resuming from" in result.stdout


def test_kill_after_mid_epoch_checkpoint_resumes_bit_identical(image_root, tmp_path, reference):
    kill_after_step_2_and_resume(tiny_args(image_root, tmp_path, "checkpoint.interval_steps=2"), tmp_path)
    assert_bit_identical(final_weights(tmp_path), reference)


def test_sigterm_saves_at_the_step_reached(image_root, tmp_path, reference, reference_run):
    args = tiny_args(image_root, tmp_path)
    process = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=script_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT,
                               text=True)
    for line in process.stdout:
        if "step 3/" in line:
            break
    process.send_signal(signal.SIGTERM)
    started = time.time()
    output = process.communicate(timeout=60)[0]
    assert time.time() - started < 60 and process.returncode == 0, output
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert state["epoch"] == 0 and state["batch"] >= 3
    result = run_train(args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert_bit_identical(final_weights(tmp_path), reference)
    # The resumed epoch's train_loss is the mean over the whole epoch (it covered only the steps after the
    # resume): equal to the uninterrupted run's up to the float32 sum of the per-step losses being split in two.
    for resumed, uninterrupted in zip(metrics(tmp_path), metrics(reference_run), strict=True):
        assert resumed["train_loss"] == pytest.approx(uninterrupted["train_loss"], rel=1e-6)
    again = run_train(args)
    assert again.returncode == 0 and "already complete" in again.stdout


def test_truncated_checkpoint_falls_back_to_previous(image_root, tmp_path):
    args = tiny_args(image_root, tmp_path, "train.epochs=1", "checkpoint.interval_steps=2")
    assert run_train(args).returncode == 0
    folder = tmp_path / "checkpoints"
    newest = sorted(folder.glob("step-*.pt"))[-1]
    for path in (folder / "last.pt", newest):
        path.write_bytes(path.read_bytes()[:1000])
    result = run_train([*args[:-2], "train.epochs=2", args[-1]])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "unreadable" in result.stdout and "resuming from" in result.stdout
    assert [r["epoch"] for r in metrics(tmp_path)] == [1, 2]


def test_checkpoint_of_another_architecture_is_refused(image_root, tmp_path):
    assert run_train(tiny_args(image_root, tmp_path, "train.epochs=1")).returncode == 0
    result = run_train(tiny_args(image_root, tmp_path, "model.name=resnet50d"))
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "resnet50d" in result.stderr and "Traceback" not in result.stderr
    assert "missing keys: " in result.stderr and "unexpected keys: " in result.stderr


@pytest.mark.dist
def test_elastic_restart_after_a_worker_is_killed(image_root, tmp_path, tmp_path_factory):
    launcher = [*TORCHRUN, "--standalone", "--nproc-per-node=2"]
    env = script_env()
    reference_out = tmp_path_factory.mktemp("ddp_reference")
    done = subprocess.run([*launcher, *tiny_args(image_root, reference_out)], capture_output=True, text=True,
                          cwd=ROOT, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    args = tiny_args(image_root, tmp_path, "checkpoint.interval_steps=1")
    job = subprocess.Popen([*launcher, "--max-restarts=1", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    wait_for(tmp_path / "checkpoints" / "step-000000002.pt", job)
    pgrep = ["pgrep", "-f", "-P", str(job.pid), "train.py"]
    workers = subprocess.run(pgrep, capture_output=True, text=True).stdout.split()
    assert workers, "no worker processes found"
    os.kill(int(workers[-1]), signal.SIGKILL)
    output = job.communicate(timeout=600)[0]
    assert job.returncode == 0, output[-4000:]
    assert_bit_identical(final_weights(tmp_path), final_weights(reference_out))


@pytest.mark.dist
def test_resume_at_epoch_boundary_with_more_processes(image_root, tmp_path):
    one = run_train(tiny_args(image_root, tmp_path, "train.epochs=1"))
    assert one.returncode == 0, one.stdout + one.stderr
    run_script(tiny_args(image_root, tmp_path), launcher=[*TORCHRUN, "--standalone", "--nproc-per-node=2"])
    rows = metrics(tmp_path)
    assert [(r["epoch"], r["world_size"]) for r in rows] == [(1, 1), (2, 2)]
    # 48 images: 6 steps of 8 on one process, then 3 steps of 2 x 8
    assert rows[-1]["step"] == 1 * 3 + 3


@pytest.fixture(scope="module")
def shuffled_shards(image_root, tmp_path_factory) -> Path:
    """The 48 training images in 6 to 8 shards, packed in a shuffled order (pack_dataset.py --shuffle)."""
    out = tmp_path_factory.mktemp("shuffled")
    result = pack(image_root, out, "--shard-size", "20000", "--shuffle", "1")
    assert result.returncode == 0, result.stderr
    return out


def test_another_shuffle_is_refused_mid_epoch_and_taken_at_an_epoch_boundary(shuffled_shards, tmp_path):
    """data.shuffle and data.shuffle_window deal the epoch's order: a mid-epoch resume with another would use
    some images twice and others never, so it is one error line naming the key, checkpoint.allow_changes or
    not; from the epoch's end the next epoch is dealt the new way, and the run says so."""
    def args(*extra: str) -> list[str]:
        return train_args(shuffled_shards, tmp_path, "data.backend=torchvision", "checkpoint.interval_steps=2",
                          "checkpoint.keep_last=9", *extra)
    first = run_script(args("train.epochs=1", "data.shuffle=shards", "data.shuffle_window=2"))
    assert "data.shuffle=shards: images shuffled within windows of 2 shards (about " in first.stdout, first.stdout
    mid = [f"checkpoint.resume={tmp_path}/checkpoints/step-000000002.pt", "train.epochs=2"]
    for change, key, old, new in ((["data.shuffle=global"], "data.shuffle", "shards", "global"),
                                  (["data.shuffle=shards"], "data.shuffle_window", "2", "8"),
                                  (["data.shuffle=shards", "data.shuffle_window=3", "checkpoint.allow_changes=true"],
                                   "data.shuffle_window", "2", "3")):
        refused = run_script(args(*mid, *change), expect=2)
        one_line_error(refused, f"taken mid-epoch with {key}={old}; resume it with {key}={old} (now {new})",
                       "change it at an epoch boundary")
    boundary = run_script(args("train.epochs=2", "data.shuffle=global"))
    assert "data order from epoch 2: shards (windows of 2 shards) -> global (data.shuffle)" in boundary.stdout
    assert [row["epoch"] for row in metrics(tmp_path)] == [1, 2]
    saved = torch.load(tmp_path / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert saved["epoch_shuffle"] == {"shuffle": "global"}
