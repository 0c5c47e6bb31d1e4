"""The node-local shard cache's locks (shard_cache.py): every descriptor that holds one is opened here.

flock's lock belongs to an open file description, so a forked child's inherited copy (a DataLoader worker
forked while a prefetch thread held a shard's lock) would keep the parent's lock for the child's whole life,
and every other process of the node would wait on it. A forked child closes its copies first thing: the
parent's locks stay the parent's.
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


def _after_fork_in_child() -> None:
    global _HELD_LOCK
    for fd in _HELD:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()
    _HELD_LOCK = threading.Lock()


os.register_at_fork(before=lambda: _HELD_LOCK.acquire(), after_in_parent=lambda: _HELD_LOCK.release(),
                    after_in_child=_after_fork_in_child)


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
