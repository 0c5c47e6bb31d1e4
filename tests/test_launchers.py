"""The launchers under stop signals: scripts/train_multinode.sh (torchrun, 2 gloo workers) given SIGUSR1 or
SIGTERM on its whole process group, and scripts/train_slurm.sbatch on a real SLURM cluster (a one-node one
from scripts/setup_slurm.sh) given its time-limit warning: checkpoint at the step reached, exit 0, nothing
left running, and the rerun (or the requeued job) finishes the training."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def overrides(out: Path, *extra: str) -> list[str]:
    return [f"output_dir={out}", "data.backend=synthetic", "model.num_classes=4", "data.crop_size=32",
            "data.val_crop_size=32", "data.workers=1", "train.batch_size=8", "train.log_interval=1",
            "checkpoint.interval_steps=0", "checkpoint.keep_last=5", *extra]


def launcher_env(**extra: str) -> dict:
    # One thread per process: 2 cores are shared, and oversubscribed OpenMP threads slowed steps ~10x here.
    return dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", **extra)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def left_running(out: Path) -> str:
    """Processes whose command line names the run folder (the workers, torchrun, the launcher)."""
    return subprocess.run(["pgrep", "-af", str(out)], capture_output=True, text=True).stdout


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def epochs_logged(out: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]


class Lines:
    """Collects a process's output on a thread, so that waiting for a line can time out."""

    def __init__(self, process: subprocess.Popen):
        self.text = ""
        self._changed = threading.Condition()
        threading.Thread(target=self._read, args=(process.stdout,), daemon=True).start()

    def _read(self, stream) -> None:
        for line in stream:
            with self._changed:
                self.text += line
                self._changed.notify_all()

    def wait_for(self, needle: str, timeout: float) -> None:
        with self._changed:
            if not self._changed.wait_for(lambda: needle in self.text, timeout):
                raise AssertionError(f"{needle!r} not printed within {timeout} s:\n{self.text[-3000:]}")


@pytest.mark.dist
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["SIGUSR1", "SIGTERM"])
def test_multinode_launcher_stops_on_a_signal_to_its_group_and_resumes(sig, tmp_path):
    out = tmp_path / "run"
    # 320 images / (2 x 8) = 20 steps an epoch; DDP ranks agree on a stop every 10 steps, so it lands mid-epoch.
    cmd = [str(ROOT / "scripts" / "train_multinode.sh"), str(ROOT / "configs" / "demo.yaml"),
           *overrides(out, "data.synthetic_size=320", "train.epochs=1")]
    env = launcher_env(NNODES="1", NPROC_PER_NODE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    # start_new_session: `setsid`, so the launcher leads a process group of its own, as under a scheduler.
    job = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    try:
        lines = Lines(job)
        lines.wait_for("step 2/", timeout=180)
        os.killpg(job.pid, sig)
        signalled = time.monotonic()
        job.wait(timeout=120)
        took = time.monotonic() - signalled
        still_running = left_running(out)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        subprocess.run(["pkill", "-KILL", "-f", str(out)])  # orphaned workers, when the test fails
    assert job.returncode == 0, f"exit status {job.returncode}:\n{lines.text[-3000:]}"
    assert still_running == "" and took < 60, (still_running, f"exit {took:.0f} s after the signal")
    lines.wait_for("stopped at step", timeout=5)
    state = load(out / "checkpoints" / "last.pt")
    assert state["epoch"] == 0 and 2 <= state["batch"] < 20, (state["epoch"], state["batch"])
    assert f"stopped at step {state['step']};" in lines.text

    env["MASTER_PORT"] = str(free_port())
    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"(epoch 0, step {state['step']})" in rerun.stdout  # "resuming from ... (epoch 0, step N)"
    assert epochs_logged(out) == [1] and load(out / "checkpoints" / "last.pt")["epoch"] == 1
    assert left_running(out) == ""


def wait_for_text(path: Path, needle: str, job_id: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text() if path.exists() else ""
        if needle in text:
            return text
        queued = subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout.strip()
        assert queued, f"job {job_id} ended before printing {needle!r}:\n{text[-3000:]}"
        assert time.monotonic() < deadline, f"job {job_id}: {needle!r} not printed within {timeout} s:\n{text}"
        time.sleep(0.2)


def wait_until_gone(job_id: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout.strip():
        assert time.monotonic() < deadline, f"job {job_id} still queued after {timeout} s"
        time.sleep(0.5)


@pytest.mark.slurm
def test_slurm_job_checkpoints_on_its_time_limit_signal_requeues_and_finishes(tmp_path):
    if shutil.which("sbatch") is None:
        pytest.skip("sbatch not found: run scripts/setup_slurm.sh (as root) for a one-node SLURM cluster")
    out = tmp_path / "run"
    log = tmp_path / "slurm.out"
    # 64 images / 8 = 8 steps an epoch on one CPU process; submitted from the repository (SLURM_SUBMIT_DIR).
    submit = subprocess.run(
        ["sbatch", "--parsable", "--job-name=resnest-test", "--cpus-per-task=1", f"--output={log}",
         "scripts/train_slurm.sbatch", "configs/demo.yaml",
         *overrides(out, "data.synthetic_size=64", "train.epochs=2")],
        cwd=ROOT, env=launcher_env(MASTER_PORT=str(free_port())), capture_output=True, text=True, timeout=60)
    assert submit.returncode == 0, submit.stderr
    job_id = submit.stdout.strip().split(";")[0]
    try:
        wait_for_text(log, "step 2/", job_id, timeout=180)
        # What `#SBATCH --signal=B:USR1@120` sends at the time limit: SIGUSR1 to the batch shell only.
        subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True, timeout=30)
        wait_for_text(log, "requeueing", job_id, timeout=120)
        wait_until_gone(job_id, timeout=300)
        details = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    finally:
        subprocess.run(["scancel", job_id])
    text = log.read_text()
    assert "JobState=COMPLETED" in details and "Restarts=1" in details and "ExitCode=0:0" in details, details
    first, second = text.split(f"job {job_id} start 2")
    stopped = int(re.search(r"stopped at step (\d+);", first).group(1))
    state = load(out / "checkpoints" / f"step-{stopped:09d}.pt")
    assert state["epoch"] == 0 and 0 < state["batch"] < 8 and state["step"] == stopped
    assert f"resuming from {out / 'checkpoints' / 'last.pt'} (epoch 0, step {stopped})" in second
    assert "finished: 2 epochs" in second, text[-3000:]
    assert epochs_logged(out) == [1, 2] and load(out / "checkpoints" / "last.pt")["epoch"] == 2
    assert left_running(out) == ""
