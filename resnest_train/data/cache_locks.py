"""The node-local shard cache's locks (shard_cache.py): every descriptor that holds one is opened here.

flock's lock belongs to an open file description, so a forked child's inherited copy (a DataLoader worker
forked while a prefetch thread held a shard's lock) would keep the parent's lock for the child's whole life,
and every other process of the node would wait on it. A forked child closes its copies first thing: the
parent's locks stay the parent's.

A fork also waits for the downloads in flight (`downloading`): a thread inside fsspec or botocore may hold
an import lock or one of theirs, which a child forked then would wait on forever.
"""

from __future__ import annotations

import fcntl
import os
import threading
from contextlib import contextmanager
from pathlib import Path

_HELD: set[int] = set()
_HELD_LOCK = threading.Lock()


def open_held(path: Path, flags: int) -> int:
    with _HELD_LOCK:
        fd = os.open(path, flags, 0o644)
        _HELD.add(fd)
        return fd


def close_held(fd: int) -> None:
    with _HELD_LOCK:
        _HELD.discard(fd)
        os.close(fd)


_QUIET = threading.Condition()  # held by a fork; `active`: downloads in flight
_ACTIVE = [0]


@contextmanager
def downloading():
    """A download in flight: a fork of this process waits for it to end."""
    with _QUIET:
        _ACTIVE[0] += 1
    try:
        yield
    finally:
        with _QUIET:
            _ACTIVE[0] -= 1
            _QUIET.notify_all()


def _before_fork() -> None:
    _QUIET.acquire()
    while _ACTIVE[0]:
        _QUIET.wait()
    _HELD_LOCK.acquire()


def _after_fork_in_parent() -> None:
    _HELD_LOCK.release()
    _QUIET.release()


def _after_fork_in_child() -> None:
    global _HELD_LOCK, _QUIET
    for fd in _HELD:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()
    _HELD_LOCK, _QUIET, _ACTIVE[0] = threading.Lock(), threading.Condition(), 0


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)


@contextmanager
def locked(path: Path, mode: int = fcntl.LOCK_EX):
    fd = open_held(path, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, mode)
        yield fd
    finally:
        close_held(fd)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
