"""Background checkpoint writes: the snapshot owns its memory, submit returns before the file is written,
the files are the synchronous save's (atomic, linked, pruned), a failed write is reported once at the next
submit or wait with the previous checkpoint intact and no temporary left; and the compact RNG state."""

from __future__ import annotations

import errno
import io
import logging
import os
import random
import threading
import time
from collections import OrderedDict

import numpy as np
import pytest
import torch

from resnest_train.checkpoint import files as ckpt
from resnest_train.checkpoint import writer as checkpoint_writer
from resnest_train.checkpoint.writer import CheckpointWriter, snapshot


def state(step: int) -> dict:
    return {"model": {"w": torch.full((3,), float(step))}, "optimizer": {}, "epoch": 0, "batch": step,
            "step": step, "ranks": [{}]}


def files(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_snapshot_is_independent_of_later_in_place_changes():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    live = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": 1, "pair": (1, [2])}
    copy = snapshot(live)
    expected = {name: t.clone() for name, t in live["model"].items()}
    momentum = live["optimizer"]["state"][0]["momentum_buffer"].clone()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()  # updates the momentum buffers in place
    live["optimizer"]["state"][0]["step_extra"] = 1
    live["pair"][1].append(3)
    for name, tensor in copy["model"].items():
        assert torch.equal(tensor, expected[name]) and not tensor.requires_grad
    assert torch.equal(copy["optimizer"]["state"][0]["momentum_buffer"], momentum)
    assert "step_extra" not in copy["optimizer"]["state"][0] and copy["pair"] == (1, [2])
    assert isinstance(copy["model"], OrderedDict) and copy["model"]._metadata == live["model"]._metadata
    model.load_state_dict(copy["model"])  # still a state dict load_state_dict takes


def slow_save(seconds: float):
    """save_checkpoint after a delay, to see what waits for the write and what does not."""
    real = ckpt.save_checkpoint

    def save(*args, **kwargs):
        time.sleep(seconds)
        return real(*args, **kwargs)
    return save


def test_submit_returns_before_the_write_and_wait_waits(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint_writer, "save_checkpoint", slow_save(1.0))
    folder = ckpt.checkpoint_dir(tmp_path)
    with CheckpointWriter(tmp_path, keep_last=2) as writer:
        started = time.perf_counter()
        writer.submit(snapshot(state(1)), is_best=False)
        assert time.perf_counter() - started < 0.5
        assert writer.in_flight and not (folder / "last.pt").exists()
        assert writer.wait() == folder / "last.pt"
        assert not writer.in_flight
        assert time.perf_counter() - started >= 1.0
        assert writer.wait() is None  # nothing in flight
        writer.submit(snapshot(state(2)), is_best=False)
        writer.submit(snapshot(state(3)), is_best=False)  # waits for step 2's write first
        assert torch.load(folder / "last.pt", weights_only=True)["step"] == 2
    assert torch.load(folder / "last.pt", weights_only=True)["step"] == 3  # close waited


def test_files_are_atomic_linked_and_pruned_as_a_synchronous_save(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="resnest_train"), CheckpointWriter(tmp_path, keep_last=2) as writer:
        for step in range(1, 6):
            writer.submit(snapshot(state(step)), is_best=step == 3)
    folder = ckpt.checkpoint_dir(tmp_path)
    assert files(folder) == ["best.pt", "last.pt", "step-000000004.pt", "step-000000005.pt"]
    assert os.path.samefile(folder / "last.pt", folder / "step-000000005.pt")
    assert torch.load(folder / "best.pt", weights_only=True)["step"] == 3
    assert ckpt.find_resume_state("auto", tmp_path).step == 5
    assert f"saved {folder / 'last.pt'} (epoch 0, step 5)" in caplog.messages


@pytest.mark.parametrize("report", ["submit", "wait", "close"])
def test_failed_write_is_reported_once_previous_checkpoint_intact(tmp_path, monkeypatch, report):
    writer = CheckpointWriter(tmp_path, keep_last=2)
    writer.submit(snapshot(state(1)), is_best=False)
    writer.wait()

    def full_disk(obj, handle):
        handle.write(b"partial bytes")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full_disk)
    writer.submit(snapshot(state(2)), is_best=False)  # returns: the failure comes later
    message = r"cannot write checkpoint .*last.pt: disk full at .* needed, .* free \(the previous checkpoint is intact"
    with pytest.raises(ckpt.CheckpointError, match=message):
        {"submit": lambda: writer.submit(snapshot(state(3)), is_best=False), "wait": writer.wait,
         "close": writer.close}[report]()
    monkeypatch.undo()
    folder = ckpt.checkpoint_dir(tmp_path)
    assert files(folder) == ["last.pt", "step-000000001.pt"]  # no temporary, step 3 not written either
    assert torch.load(folder / "last.pt", weights_only=True)["step"] == 1
    if report != "close":
        assert writer.wait() is None  # reported once
        writer.close()


def test_a_failed_write_on_exit_does_not_hide_the_exception_in_flight(tmp_path, monkeypatch, caplog):
    def broken_disk(obj, handle):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(torch, "save", broken_disk)
    with pytest.raises(KeyError), CheckpointWriter(tmp_path, keep_last=0) as writer:
        writer.submit(snapshot(state(1)), is_best=False)
        raise KeyError("training failed")
    assert any("cannot write checkpoint" in message for message in caplog.messages)


def test_writes_run_in_one_non_daemon_thread(tmp_path, monkeypatch):
    seen = []
    real = ckpt.save_checkpoint

    def record(*args, **kwargs):
        seen.append(threading.current_thread())
        return real(*args, **kwargs)
    monkeypatch.setattr(checkpoint_writer, "save_checkpoint", record)
    with CheckpointWriter(tmp_path, keep_last=0) as writer:
        writer.submit(snapshot(state(1)), is_best=False)
        writer.submit(snapshot(state(2)), is_best=False)
    assert seen[0] is seen[1] and seen[0] is not threading.main_thread() and not seen[0].daemon


def draw() -> tuple:
    return random.random(), np.random.rand(), np.random.randn(), torch.rand(3), torch.randn(3)


def compact_rng_state() -> dict:
    """A rank's generator states as format-1 checkpoints held them (before randomness was seeded per step and
    sample): Mersenne Twister words as int32 tensors of the same bits."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    as_int32 = (lambda words: torch.from_numpy(np.array(words, dtype=np.uint32).view(np.int32)))
    return {"python": [version, as_int32(internal), gauss], "numpy": [name, as_int32(keys), pos, has_gauss, cached],
            "torch": torch.get_rng_state()}


def old_rng_state() -> dict:
    """The states as the checkpoints before those held them: lists of ints."""
    version, internal, gauss = random.getstate()
    numpy_state = np.random.get_state()
    return {"python": [version, list(internal), gauss],
            "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
            "torch": torch.get_rng_state().tolist()}


@pytest.mark.parametrize("old_format", [False, True])
def test_saved_rng_states_of_old_checkpoints_are_restored(old_format):
    draw()
    np.random.randn()  # leaves a cached gaussian in numpy's state
    saved = old_rng_state() if old_format else compact_rng_state()
    expected = draw()
    buffer = io.BytesIO()
    torch.save({"ranks": [{"rng": saved}]}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)["ranks"][0]["rng"]
    draw()
    ckpt.set_rng_state(loaded)
    again = draw()
    assert again[:3] == expected[:3]
    assert torch.equal(again[3], expected[3]) and torch.equal(again[4], expected[4])
