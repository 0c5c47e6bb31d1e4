"""Nothing lost, no traceback: what real users, data and faults do to a run (tiny CPU runs).

Each case once made a run lose work, silently do the wrong thing, or print a traceback."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import (
    ROOT,
    TORCHRUN,
    assert_one_error_everywhere,
    launch_ranks,
    metrics,
    run_script,
    script_env,
    train_args,
)

pytestmark = pytest.mark.slow


def last_state(out) -> dict:
    return torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)


def one_line_error(result, *needles: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_following_the_mismatch_advice_never_destroys_the_run(tmp_path):
    run_script(train_args(None, tmp_path, "train.epochs=1"))
    before = {p.name: p.read_bytes() for p in (tmp_path / "checkpoints").iterdir()}
    mismatch = run_script(train_args(None, tmp_path, "train.epochs=1", "model.name=resnet50d"), expect=2)
    one_line_error(mismatch, "does not fit model resnet50d", "use another output_dir")
    assert "resume=null" not in mismatch.stderr
    fresh = run_script(train_args(None, tmp_path, "train.epochs=1", "checkpoint.resume=null"), expect=2)
    one_line_error(fresh, "holds the checkpoints of another run", "checkpoint.overwrite=true")
    assert {p.name: p.read_bytes() for p in (tmp_path / "checkpoints").iterdir()} == before
    run_script(train_args(None, tmp_path, "train.epochs=1", "checkpoint.resume=null", "checkpoint.overwrite=true",
                          "model.name=resnet50d"))
    assert last_state(tmp_path)["config"]["model"]["name"] == "resnet50d"


def test_unreadable_checkpoints_are_an_error_or_fall_back_to_best(tmp_path):
    args = lambda epochs: train_args(None, tmp_path, f"train.epochs={epochs}", "checkpoint.keep_last=0")  # noqa: E731
    run_script(args(1))
    epoch_one = tmp_path / "epoch1.pt"
    shutil.copy(tmp_path / "checkpoints" / "last.pt", epoch_one)
    run_script(args(2))
    last, best = tmp_path / "checkpoints" / "last.pt", tmp_path / "checkpoints" / "best.pt"
    data = last.read_bytes()
    last.unlink()
    last.write_bytes(data[: len(data) // 3])  # truncated: unreadable
    best.unlink()
    one_line_error(run_script(args(3), expect=2), "no checkpoint in", "can be resumed", "last.pt: unreadable")
    assert [r["epoch"] for r in metrics(tmp_path)] == [1, 2]  # nothing trained, nothing overwritten
    shutil.copy(epoch_one, best)  # best.pt holds a resume state too
    result = run_script(args(3))
    assert "resuming from the older best.pt" in result.stdout
    assert [r["epoch"] for r in metrics(tmp_path)] == [1, 2, 3]  # epoch 2 rewritten, not duplicated


def start(args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=script_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def wait_for_line(process: subprocess.Popen, needle: str) -> list[str]:
    lines = []
    for line in process.stdout:
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError("".join(lines)[-3000:])


@pytest.mark.parametrize("how", ["sigterm-group-torchvision", "sigint"])
def test_stop_signals_save_at_the_step_reached(image_root, tmp_path, how):
    """SIGTERM to the whole process group (systemd, scancel, timeout) must not kill DataLoader workers
    first; Ctrl-C (SIGINT) saves like SIGTERM. Both: exit 0, a checkpoint at the step, rerun finishes."""
    backend = "torchvision" if "torchvision" in how else "dali"
    args = train_args(image_root, tmp_path, "train.epochs=2", f"data.backend={backend}", "data.workers=2")
    process = start(args, start_new_session=True)
    wait_for_line(process, "step 2/")
    if how == "sigint":
        process.send_signal(signal.SIGINT)
    else:
        os.killpg(process.pid, signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 0, output[-3000:]
    assert "stopped at step" in output and "Traceback" not in output
    state = last_state(tmp_path)
    assert state["epoch"] == 0 and state["batch"] >= 2
    assert not list((tmp_path / "checkpoints").glob(".*.tmp"))
    run_script(args)
    assert last_state(tmp_path)["epoch"] == 2


def test_second_trainer_on_one_run_folder_is_refused(tmp_path):
    first = start(train_args(None, tmp_path, "train.epochs=50"))
    wait_for_line(first, "step 1/")
    second = run_script(train_args(None, tmp_path, "train.epochs=50"), expect=2)
    one_line_error(second, f"is in use by pid {first.pid} on ")
    first.send_signal(signal.SIGTERM)
    assert first.communicate(timeout=120)[0] and first.returncode == 0


def test_batch_size_change_refused_mid_epoch_replaced_at_a_boundary(tmp_path):
    """64 images: 8 steps of 8 per epoch, then 4 of 16."""
    process = start(train_args(None, tmp_path, "train.epochs=2", "checkpoint.interval_steps=3"))
    deadline = time.time() + 300
    while not (tmp_path / "checkpoints" / "step-000000003.pt").exists():
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.05)
    process.kill()
    process.wait()
    refused = run_script(train_args(None, tmp_path, "train.epochs=2", "train.batch_size=16"), expect=2)
    one_line_error(refused, "mid-epoch with a global batch of 8", "now 16")
    run_script(train_args(None, tmp_path, "train.epochs=1"))  # finish epoch 1 with the same batch
    run_script(train_args(None, tmp_path, "train.epochs=2", "train.batch_size=16"))
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [8, 4 + 4]  # the schedule re-placed at epoch 1 of the new layout
    assert rows[-1]["lr"] == pytest.approx(0.0, abs=1e-9)  # and it ends where the schedule ends


@pytest.mark.parametrize("extra,needles", [
    (["train.batch_size=64"], ["train.batch_size=64 x 1 processes is larger than the 48 training images"]),
    (["model.num_classes=3"], ["has 4 classes but model.num_classes=3"]),
])
def test_data_that_does_not_fit_the_config_is_one_line(image_root, tmp_path, extra, needles):
    one_line_error(run_script(train_args(image_root, tmp_path, *extra), expect=2), *needles)


@pytest.mark.parametrize("make_bad", ["file", "under_file"])
def test_unusable_output_dir_is_named_before_the_dataset_is_read(tmp_path, make_bad):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    out = blocker if make_bad == "file" else blocker / "run"
    one_line_error(run_script(train_args(tmp_path / "no-such-data", out), expect=2), "output_dir", str(blocker))


def test_read_only_output_dir_is_named_before_the_dataset_is_read():
    """Root writes anywhere: as root, the trainer runs as `nobody` (setpriv) to meet a read-only folder."""
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o755)
        home = Path(tmp) / "home"
        home.mkdir(mode=0o777)
        os.chmod(home, 0o777)
        read_only = Path(tmp) / "ro"
        read_only.mkdir(mode=0o555)
        os.chmod(read_only, 0o555)
        launcher = [sys.executable]
        if os.geteuid() == 0:
            launcher = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable]
        result = run_script(train_args(Path(tmp) / "no-such-data", read_only / "run"), launcher=launcher,
                            env=script_env(HOME=str(home)), expect=2)
        one_line_error(result, "output_dir", str(read_only / "run"))


@pytest.mark.dist
@pytest.mark.parametrize("backend", ["torchvision", "dali"])
def test_a_checkpoint_write_that_fails_is_one_line_on_every_rank_within_seconds(image_root, tmp_path, backend):
    """The checkpoints folder replaced by a file (an OSError the save did not handle: tracebacks on every rank,
    the other rank learning of it from gloo's 'Connection closed by peer'; torchvision runs then stalled
    ~62 s in their DataLoader workers' shutdown)."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").write_text("not a folder")
    results = launch_ranks(train_args(image_root, out, f"data.backend={backend}", "train.epochs=1",
                                      "checkpoint.interval_steps=2"))
    line = assert_one_error_everywhere(results, f"cannot write checkpoint {out}/checkpoints/last.pt: ")
    assert "no earlier checkpoint of this run exists" in line


def processes_running(needle: str) -> list[int]:
    """PIDs of the live processes whose command line holds `needle`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if needle in command and "torch.distributed.run" not in command and state != "Z":
                found.append(int(entry.name))
    return found


@pytest.mark.dist
def test_workers_never_outlive_their_launcher(tmp_path):
    """torchrun SIGKILLed (the OOM killer, kill -9): its workers, each in a session of its own, trained on
    unsupervised to the end of the run, and held the run folder. Now each notices within seconds, the ranks
    checkpoint together and exit, and the folder is free for the rerun."""
    out = tmp_path / "run"
    launcher = subprocess.Popen([*TORCHRUN, "--standalone", "--nproc-per-node=2",
                                 *train_args(None, out, "train.epochs=500")], cwd=ROOT, env=script_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_line(launcher, "step 3/")
    workers = processes_running(str(out))
    assert len(workers) == 2, workers
    launcher.kill()
    launcher.wait()
    deadline = time.monotonic() + 30
    while processes_running(str(out)) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = processes_running(str(out))
    for pid in left:  # never leave them running, whatever the outcome
        os.kill(pid, signal.SIGKILL)
    assert not left, "the workers outlived their launcher by 30 s"
    state = last_state(out)
    assert state["step"] >= 3 and state["epoch"] < 500  # the ranks checkpointed where they were
    run_script(train_args(None, out, f"train.epochs={state['epoch'] + 1}"),  # the folder is free: the rerun continues
               launcher=[*TORCHRUN, "--standalone", "--nproc-per-node=2"])
    assert last_state(out)["epoch"] == state["epoch"] + 1


@pytest.mark.dist
def test_a_layout_error_on_three_processes_is_one_line_on_each(tmp_path):
    """Every rank stops on the same configuration error: each said its line, followed on two of them by
    the C++ stack of a TCPStore call that failed once rank 0 (holding the store) had exited."""
    results = launch_ranks(train_args(None, tmp_path / "run", "train.global_batch=16", "train.epochs=1"),
                           world_size=3)
    line = assert_one_error_everywhere(results, "train.global_batch=16 cannot be split over 3 processes")
    assert all(result.stderr == line + "\n" for result in results), [r.stderr[-1500:] for r in results]
