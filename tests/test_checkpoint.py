"""Atomic checkpoint writes: a failed save (disk full) keeps the previous checkpoint and says so."""

from __future__ import annotations

import errno

import pytest
import torch

from resnest_train import checkpoint as ckpt


def test_disk_full_keeps_previous_checkpoint(tmp_path, monkeypatch):
    state = {"model": {"w": torch.ones(3)}, "step": 1, "epoch": 0}
    ckpt.save_checkpoint(state, tmp_path, keep_last=2, is_best=False)

    def full_disk(obj, handle):
        handle.write(b"partial bytes")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(ckpt.CheckpointError, match="No space left on device.*previous checkpoint is intact"):
        ckpt.save_checkpoint({**state, "step": 2}, tmp_path, keep_last=2, is_best=False)
    monkeypatch.undo()
    folder = ckpt.checkpoint_dir(tmp_path)
    assert torch.load(folder / "last.pt", weights_only=True)["step"] == 1
    assert sorted(p.name for p in folder.iterdir()) == ["last.pt", "step-000000001.pt"]  # no temp file left


def test_keep_last_and_newest_by_step(tmp_path):
    for step in range(1, 6):
        ckpt.save_checkpoint({"model": {}, "step": step, "epoch": 0}, tmp_path, keep_last=2, is_best=step == 3)
    folder = ckpt.checkpoint_dir(tmp_path)
    assert sorted(p.name for p in folder.glob("step-*.pt")) == ["step-000000004.pt", "step-000000005.pt"]
    assert torch.load(folder / "best.pt", weights_only=True)["step"] == 3
    assert ckpt.find_resume_state("auto", tmp_path)["step"] == 5
    assert ckpt.find_resume_state(None, tmp_path) is None
    with pytest.raises(ckpt.CheckpointError, match="file not found"):
        ckpt.find_resume_state(str(tmp_path / "nope.pt"), tmp_path)
