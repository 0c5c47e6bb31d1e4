"""Atomic checkpoints, the run folder's lock, and finding the state to resume: nothing is lost but the
steps since the last save, and no run ever writes over another's checkpoints unasked.

Rank 0 writes `checkpoints/last.pt` once, through a temporary file in the same folder, fsync, then
`os.replace`; `step-N.pt` and `best.pt` are hard links to that file (a copy where links are not
supported), so a save costs one write whatever `keep_last` is; `checkpoint_writer.py` runs that write in
a background thread, on a host copy of the state. A failed save (full disk, torch's RuntimeError from its
zip writer, Ctrl-C) removes its temporary file and leaves the previous checkpoint intact. What a checkpoint
holds is `format.py`'s; resuming reads only the chosen file (memory-mapped).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import random
import re
import shutil
import socket
from pathlib import Path

import numpy as np
import torch

from resnest_train.checkpoint.format import Checkpoint, FormatError, position_of
from resnest_train.errors import UserError, describe, free_bytes

log = logging.getLogger("resnest_train")

_STEP_NAME = re.compile(r"step-(\d+)\.pt$")


class CheckpointError(UserError):
    """A checkpoint that cannot be used for this run (wrong model, config or world size; unwritable)."""


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def _fsync_dir(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def state_bytes(obj) -> int:
    """The bytes of the tensors in a nested state: about the size of its checkpoint file."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_bytes(value) for value in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_bytes(value) for value in obj)
    return 0


def _write_failure(exc: BaseException, path: Path, needed: int, had_previous: bool) -> CheckpointError:
    """The one line of a failed write: what failed, a full disk said as such (torch's zip writer reports
    ENOSPC as "[enforce fail at inline_container.cc] unexpected pos": judged by the space left), and the
    previous checkpoint named only where one exists."""
    if isinstance(exc, RuntimeError) and ("unexpected pos" in str(exc) or "file write failed" in str(exc)):
        free = free_bytes(path.parent)
        if free is not None and free < needed + 2**20:
            exc = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path.parent))
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        reason = describe(OSError(exc.errno, exc.strerror, str(path.parent)), needed_bytes=needed)
        reason = f"cannot write checkpoint {path}: {reason}"
    elif isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(path) else ""
        reason = f"cannot write checkpoint {path}: {exc.strerror or exc}{where}"
    else:
        reason = f"cannot write checkpoint {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    kept = "the previous checkpoint is intact" if had_previous else "no earlier checkpoint of this run exists"
    return CheckpointError(f"{reason} ({kept})")


def atomic_save(obj: dict, path: Path) -> None:
    """`path` holds `obj` completely or keeps what it held: every failure (any OSError, torch's writer
    error, Ctrl-C) removes the temporary file; an OSError or writer error becomes one CheckpointError."""
    tmp = path.with_name(f".{path.name}.tmp")
    had_previous = path.is_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):  # a folder gone read-only refuses the clean-up too
            tmp.unlink(missing_ok=True)
        if isinstance(exc, (OSError, RuntimeError)):
            raise _write_failure(exc, path, state_bytes(obj), had_previous) from None
        raise
    try:
        _fsync_dir(path.parent)  # make the rename itself durable
    except OSError as exc:  # the new file is in place; whether its name survives a crash is not known
        raise CheckpointError(f"cannot sync {path.parent} after writing {path}: {exc.strerror or exc} (the "
                              "new checkpoint may not survive a crash of the machine)") from None


def _link(source: Path, target: Path) -> None:
    """`target` becomes another name of `source` (atomically: a temporary name, then os.replace)."""
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        tmp.unlink(missing_ok=True)
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise CheckpointError(f"cannot write checkpoint {target}: {exc.strerror or exc} ({source} is complete)") \
            from None


def save_checkpoint(state: dict, output_dir: str | Path, *, keep_last: int, is_best: bool) -> Path:
    """Write `last.pt`; link `step-N.pt` (the newest `keep_last` kept) and, when is_best, `best.pt`."""
    folder = checkpoint_dir(output_dir)
    last = folder / "last.pt"
    atomic_save(state, last)
    if keep_last > 0:
        _link(last, folder / f"step-{position_of(state)[1]:09d}.pt")
        try:
            for old in step_checkpoints(folder)[:-keep_last]:
                old.unlink(missing_ok=True)
        except OSError as exc:
            raise CheckpointError(f"cannot remove an old checkpoint in {folder}: {exc.strerror or exc} ({last} "
                                  "is complete)") from None
    if is_best:
        _link(last, folder / "best.pt")
    try:
        _fsync_dir(folder)
    except OSError as exc:
        raise CheckpointError(f"cannot sync {folder}: {exc.strerror or exc}") from None
    return last


def step_checkpoints(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("step-*.pt") if _STEP_NAME.search(p.name))


def remove_stale_temporaries(output_dir: str | Path) -> None:
    """Temporary files a killed save left behind (kill -9 cannot be cleaned up after)."""
    for tmp in checkpoint_dir(output_dir).glob(".*.tmp"):
        log.warning("removing %s, left by an interrupted save", tmp)
        tmp.unlink(missing_ok=True)


def read_checkpoint(path: Path) -> tuple[Checkpoint | None, str]:
    """(checkpoint, "") or (None, why it cannot be used)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - a truncated/corrupt file fails in many ways
        return None, f"unreadable ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
    try:
        return Checkpoint.from_state(state), ""
    except FormatError as exc:
        return None, str(exc)


def _candidates(folder: Path) -> list[Path]:
    """Newest first: last.pt, the step files, then best.pt; each file once (they may be links)."""
    paths, seen = [], set()
    for path in [folder / "last.pt", *reversed(step_checkpoints(folder)), folder / "best.pt"]:
        if path.is_file() and (key := (path.stat().st_dev, path.stat().st_ino)) not in seen:
            seen.add(key)
            paths.append(path)
    return paths


def find_resume_state(resume: str | None, output_dir: str | Path, *, overwrite: bool = False) -> Checkpoint | None:
    """`auto`: the newest readable checkpoint of output_dir (None when the folder holds none); a path: that
    file; None: a fresh run, which may not replace another run's checkpoints unless `overwrite`."""
    folder = checkpoint_dir(output_dir)
    existing = _candidates(folder) if folder.is_dir() else []
    if resume is None:
        if existing and not overwrite:
            raise CheckpointError(f"{folder} holds the checkpoints of another run; continue it with "
                                  "checkpoint.resume=auto, use another output_dir, or replace it on purpose with "
                                  "checkpoint.overwrite=true")
        return None
    if resume != "auto":
        return _read_given(Path(resume))
    problems = []
    for path in existing:
        state, why = read_checkpoint(path)
        if state is not None:
            if problems:
                log.warning("checkpoints that cannot be used: %s; resuming from the older %s",
                            "; ".join(problems), path.name)
            log.info("resuming from %s (epoch %d, step %d)", path, state.epoch, state.step)
            return state
        problems.append(f"{path.name}: {why}")
    if problems and not overwrite:
        raise CheckpointError(f"no checkpoint in {folder} can be resumed ({'; '.join(problems)}); restore one, "
                              "or start over in this folder with checkpoint.overwrite=true")
    return None


def _read_given(path: Path) -> Checkpoint:
    if path.is_dir():
        raise CheckpointError(f"checkpoint.resume: {path} is a directory, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint.resume: file not found: {path}")
    state, why = read_checkpoint(path)
    if state is None:
        raise CheckpointError(f"checkpoint.resume: {path} cannot be resumed: {why}")
    log.info("resuming from %s (epoch %d, step %d)", path, state.epoch, state.step)
    return state


class RunLock:
    """An exclusive lock on the run folder (`output_dir/.lock`), held by rank 0 for the run's life. It is
    an flock: the kernel releases it when its process dies, so a stale lock from a dead run is simply taken
    over; the file names the holder for the error a second trainer gets."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / ".lock"
        self.handle = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise CheckpointError(f"output_dir {self.path.parent} is in use by {holder}; wait for that run "
                                  "or use another output_dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        self.handle = handle
        os.register_at_fork(after_in_child=self._close_in_child)
        return self

    def _close_in_child(self) -> None:
        """A forked child (a DataLoader worker) closes its copy of the lock's descriptor: an flock lasts while
        any copy is open, so a worker outliving its killed trainer would hold the folder for seconds and
        refuse the restart. Closing a copy does not release the lock of the parent that still holds it."""
        if self.handle is not None:
            os.close(self.handle.fileno())
            self.handle = None

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self.handle.close()  # closing releases the flock
            self.handle = None


def set_rng_state(state: dict) -> None:
    """Restore the generator states a rank saved in checkpoints written before randomness was seeded per
    step and sample (Mersenne Twister words as int32 tensors, or as lists of ints in older ones)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(_words(internal)), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(_words(keys), dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.as_tensor(state["cuda"], dtype=torch.uint8))


def _words(value) -> list[int]:
    """The uint32 words, from an int32 tensor of the same bits or from a list of ints."""
    return value.numpy().view(np.uint32).tolist() if isinstance(value, torch.Tensor) else value
