"""Atomic checkpoints and resume: nothing is lost but the steps since the last save.

Rank 0 writes `checkpoints/last.pt` through a temporary file in the same folder, fsync, then `os.replace`,
so a crash (or a full disk) during a save leaves the previous checkpoint intact. A checkpoint is plain data
(tensors, numbers, strings, lists, dicts), loadable with `weights_only=True`, and holds everything a
bit-exact resume needs: model, optimizer, GradScaler, epoch, global step, the position inside the epoch,
the resolved config, the world size, and each rank's RNG and data-pipeline state.
"""

from __future__ import annotations

import logging
import os
import random
import re
from pathlib import Path

import numpy as np
import torch

from resnest_train.errors import UserError

log = logging.getLogger(__name__)

_STEP_NAME = re.compile(r"step-(\d+)\.pt$")


class CheckpointError(UserError):
    """A checkpoint that cannot be used for this run (wrong model, config or world size; unwritable)."""


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def atomic_save(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"cannot write checkpoint {path}: {exc.strerror or exc} "
                              "(the previous checkpoint is intact)") from None
    # Make the rename itself durable.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(state: dict, output_dir: str | Path, *, keep_last: int, is_best: bool) -> Path:
    """Write `step-N.pt` (kept: the newest `keep_last`), then `last.pt`, and `best.pt` when is_best."""
    folder = checkpoint_dir(output_dir)
    atomic_save(state, folder / "last.pt")
    if keep_last > 0:
        atomic_save(state, folder / f"step-{state['step']:09d}.pt")
        for old in sorted(step_checkpoints(folder))[:-keep_last]:
            old.unlink(missing_ok=True)
    if is_best:
        atomic_save(state, folder / "best.pt")
    return folder / "last.pt"


def step_checkpoints(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("step-*.pt") if _STEP_NAME.search(p.name))


def _try_load(path: Path) -> dict | None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a truncated/corrupt file fails in many ways
        log.warning("checkpoint %s is unreadable (%s); falling back to an older one", path, exc)
        return None
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        log.warning("checkpoint %s is incomplete; falling back to an older one", path)
        return None
    return state


def find_resume_state(resume: str | None, output_dir: str | Path) -> dict | None:
    """`auto`: the newest readable checkpoint of output_dir (None when there is none); a path: that file."""
    if resume is None:
        return None
    if resume != "auto":
        path = Path(resume)
        if not path.is_file():
            raise CheckpointError(f"checkpoint.resume: file not found: {path}")
        state = _try_load(path)
        if state is None:
            raise CheckpointError(f"checkpoint.resume: {path} is not a readable checkpoint")
        return state
    folder = checkpoint_dir(output_dir)
    candidates = [folder / "last.pt"] + sorted(step_checkpoints(folder), reverse=True)
    states = [(p, s) for p in candidates if p.is_file() for s in [_try_load(p)] if s is not None]
    if not states:
        return None
    # The newest by step: last.pt may be older than a step file if a save died between the two writes.
    path, state = max(states, key=lambda item: item[1]["step"])
    log.info("resuming from %s (epoch %d, step %d)", path, state["epoch"], state["step"])
    return state


def rng_state() -> dict:
    """This process's RNG states as plain lists (they travel through all_gather_object and weights_only)."""
    numpy_state = np.random.get_state()
    state = {"python": _plain(random.getstate()),
             "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def _plain(value):
    """Tuples -> lists, so `weights_only=True` can load the result."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value
