"""Checkpoint files: atomic writes whatever fails (disk full as OSError or torch's RuntimeError, Ctrl-C),
one write per save (step and best files are links), resume picks the newest readable state (best.pt
included), refuses to overwrite another run, and the run folder's lock."""

from __future__ import annotations

import errno
import multiprocessing
import os
import subprocess
import sys

import pytest
import torch

from resnest_train.checkpoint import files as ckpt
from tests.conftest import ROOT


def state(step: int) -> dict:
    return {"model": {"w": torch.full((3,), float(step))}, "optimizer": {}, "epoch": 0, "batch": step,
            "step": step, "ranks": [{}]}


def files(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1536 vs 1430"),
])
def test_failed_save_keeps_previous_checkpoint_and_no_temporary(tmp_path, monkeypatch, failure):
    ckpt.save_checkpoint(state(1), tmp_path, keep_last=2, is_best=False)

    def full_disk(obj, handle):
        handle.write(b"partial bytes")
        raise failure
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(ckpt.CheckpointError, match="cannot write checkpoint .*previous checkpoint is intact"):
        ckpt.save_checkpoint(state(2), tmp_path, keep_last=2, is_best=False)
    monkeypatch.undo()
    folder = ckpt.checkpoint_dir(tmp_path)
    assert torch.load(folder / "last.pt", weights_only=True)["step"] == 1
    assert files(folder) == ["last.pt", "step-000000001.pt"]  # no temp file left


def test_interrupted_save_leaves_no_temporary(tmp_path, monkeypatch):
    def interrupted(obj, handle):
        handle.write(b"partial bytes")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(state(1), tmp_path, keep_last=2, is_best=False)
    assert files(ckpt.checkpoint_dir(tmp_path)) == []


def test_stale_temporaries_are_removed(tmp_path):
    folder = ckpt.checkpoint_dir(tmp_path)
    folder.mkdir()
    (folder / ".step-000000003.pt.tmp").write_bytes(b"x" * 100)
    ckpt.remove_stale_temporaries(tmp_path)
    assert files(folder) == []


def test_one_write_per_save_the_rest_are_links(tmp_path):
    for step in range(1, 6):
        ckpt.save_checkpoint(state(step), tmp_path, keep_last=2, is_best=step == 3)
    folder = ckpt.checkpoint_dir(tmp_path)
    assert files(folder) == ["best.pt", "last.pt", "step-000000004.pt", "step-000000005.pt"]
    assert os.path.samefile(folder / "last.pt", folder / "step-000000005.pt")
    assert torch.load(folder / "best.pt", weights_only=True)["step"] == 3
    assert ckpt.find_resume_state("auto", tmp_path).step == 5
    with pytest.raises(ckpt.CheckpointError, match="file not found"):
        ckpt.find_resume_state(str(tmp_path / "nope.pt"), tmp_path)
    with pytest.raises(ckpt.CheckpointError, match="is a directory"):
        ckpt.find_resume_state(str(tmp_path), tmp_path)


def test_fresh_run_never_replaces_another_runs_checkpoints(tmp_path):
    ckpt.save_checkpoint(state(1), tmp_path, keep_last=1, is_best=False)
    with pytest.raises(ckpt.CheckpointError, match="holds the checkpoints of another run.*checkpoint.overwrite=true"):
        ckpt.find_resume_state(None, tmp_path)
    assert ckpt.find_resume_state(None, tmp_path, overwrite=True) is None
    assert ckpt.find_resume_state(None, tmp_path / "empty") is None


def test_unreadable_checkpoints_fall_back_to_best_or_fail(tmp_path):
    ckpt.save_checkpoint(state(3), tmp_path, keep_last=0, is_best=True)
    ckpt.save_checkpoint(state(5), tmp_path, keep_last=0, is_best=False)
    folder = ckpt.checkpoint_dir(tmp_path)
    (folder / "last.pt").write_bytes((folder / "last.pt").read_bytes()[:500])
    assert ckpt.find_resume_state("auto", tmp_path).step == 3  # best.pt holds a resume state too
    (folder / "best.pt").write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint in .* can be resumed .*last.pt: unreadable"):
        ckpt.find_resume_state("auto", tmp_path)
    with pytest.raises(ckpt.CheckpointError, match="cannot be resumed: unreadable") as info:
        ckpt.find_resume_state(str(folder / "last.pt"), tmp_path)
    assert "falling back" not in str(info.value)


def _hold_lock(folder, ready, release):
    with ckpt.RunLock(folder):
        ready.set()
        release.wait(30)


def test_run_lock_names_its_holder_and_is_taken_over_after_death(tmp_path):
    context = multiprocessing.get_context("fork")
    ready, release = context.Event(), context.Event()
    holder = context.Process(target=_hold_lock, args=(tmp_path, ready, release))
    holder.start()
    assert ready.wait(30)
    with pytest.raises(ckpt.CheckpointError, match=rf"is in use by pid {holder.pid} on "):
        ckpt.RunLock(tmp_path).__enter__()
    holder.kill()  # no cleanup: the lock file stays, the kernel drops the lock
    holder.join()
    with ckpt.RunLock(tmp_path):
        assert f"pid {os.getpid()}" in (tmp_path / ".lock").read_text()


def test_full_disk_is_called_a_full_disk_with_the_space_needed(tmp_path, monkeypatch):
    """torch's zip writer reports ENOSPC as "unexpected pos": judged by the space left, said as a full disk;
    no previous checkpoint is claimed where none exists."""
    def full_disk(obj, handle):
        handle.write(b"partial bytes")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
    monkeypatch.setattr(torch, "save", full_disk)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda _path: shutil_usage(free=3 * 2**20))
    big = {**state(1), "model": {"w": torch.zeros(10 * 2**20 // 4)}}  # 10 MB of tensors
    with pytest.raises(ckpt.CheckpointError) as error:
        ckpt.save_checkpoint(big, tmp_path, keep_last=2, is_best=False)
    message = str(error.value)
    assert "disk full at" in message and "10 MB needed" in message and "3.0 MB free" in message, message
    assert "no earlier checkpoint of this run exists" in message and "intact" not in message
    assert files(ckpt.checkpoint_dir(tmp_path)) == []


def shutil_usage(free: int):
    import shutil
    return shutil._ntuple_diskusage(total=2**40, used=2**40 - free, free=free)


@pytest.mark.parametrize("break_it", ["folder_is_a_file", "dir_fsync_eio", "read_only"])
def test_every_os_error_of_a_save_is_one_checkpoint_error(tmp_path, monkeypatch, break_it):
    """The checkpoints folder replaced by a file, an EIO from the directory fsync, a folder remounted read-only
    (where the clean-up's own unlink fails again): one CheckpointError naming the file, never an OSError."""
    if break_it == "folder_is_a_file":
        ckpt.checkpoint_dir(tmp_path).write_text("not a folder")
    elif break_it == "dir_fsync_eio":
        def eio(folder):
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(folder))
        monkeypatch.setattr(ckpt, "_fsync_dir", eio)
    else:
        ckpt.save_checkpoint(state(1), tmp_path, keep_last=2, is_best=False)

        def read_only(*args, **kwargs):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        monkeypatch.setattr(ckpt.os, "replace", read_only)
        monkeypatch.setattr(ckpt.Path, "unlink", read_only)
    with pytest.raises(ckpt.CheckpointError, match=r"cannot (write checkpoint|sync) .*checkpoints"):
        ckpt.save_checkpoint(state(2), tmp_path, keep_last=2, is_best=False)


def test_a_forked_child_does_not_keep_the_run_folder_locked_after_its_parent_dies(tmp_path):
    """A DataLoader worker (a fork of the trainer) that outlives the trainer's kill -9 must not hold the run
    folder's lock: the restart takes it at once."""
    script = (f"import os, time\nfrom resnest_train.checkpoint.files import RunLock\n"
              f"lock = RunLock({str(tmp_path)!r}).__enter__()\n"
              "if os.fork() == 0:\n    time.sleep(60)\n    os._exit(0)\n"
              "print('locked', flush=True)\ntime.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert parent.stdout.readline().strip() == "locked"
        with pytest.raises(ckpt.CheckpointError, match="is in use by pid"):
            ckpt.RunLock(tmp_path).__enter__()  # the parent holds it
        parent.kill()
        parent.wait()
        with ckpt.RunLock(tmp_path):  # its child still runs, without the lock
            pass
    finally:
        parent.kill()
        subprocess.run(["pkill", "-f", str(tmp_path)], check=False)
