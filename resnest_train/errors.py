"""User errors: every exception a CLI reports as one `error: ...` line with exit code 2, and `describe`, the
one wording of any exception as that line (a full disk with the space needed and free)."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path


class UserError(Exception):
    """A mistake in what the user gave us (config, paths, data, checkpoints), not a bug of ours."""


def size_text(nbytes: float) -> str:
    """A byte count as people read it: '812 KB', '97 MB', '1.4 GB'."""
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}" if nbytes < 10 * scale else f"{nbytes / scale:.0f} {unit}"
    return f"{nbytes:.0f} bytes"


def free_bytes(path: str | Path) -> int | None:
    """Free bytes on the filesystem of `path` (its nearest existing folder), or None when unknown."""
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def free_space(path: str | Path | None) -> str:
    """'N MB free' on the filesystem of `path`, or '' when unknown."""
    free = free_bytes(path) if path is not None else None
    return "" if free is None else f"{size_text(free)} free"


def describe(exc: BaseException, *, needed_bytes: int | None = None) -> str:
    """The `error:` line of an exception: a UserError's own words; an OSError as what failed on which path
    (a full disk said as such, with the space needed and free); anything else by its type and first line."""
    if isinstance(exc, UserError):
        return str(exc)
    if isinstance(exc, OSError):
        path = exc.filename if exc.filename is not None else ""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            needed = f", {size_text(needed_bytes)} needed" if needed_bytes else ""
            free = free_space(path)
            return f"disk full at {path}{needed}{', ' + free if free else ''}"
        reason = exc.strerror or str(exc) or type(exc).__name__
        return f"{path}: {reason}" if path else reason
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
