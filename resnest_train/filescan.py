"""The per-file work of the dataset index (index.py): list a class folder, check each image's header and
end, fully decode one on demand. Only the standard library and PIL: the scan's pool spawns fresh
interpreters that import just this module (forking a process that runs gloo or DALI threads can deadlock).
"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png"}


def check_image(path: Path | str, size: int | None = None) -> str | None:
    """Return why `path` is not a usable image, or None. Reads only its first and last bytes."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size if size is None else size
            if size == 0:
                return "empty file"
            head = os.pread(fd, 8, 0)
            tail = os.pread(fd, 64, max(0, size - 64))
        finally:
            os.close(fd)
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    if head[:3] == b"\xff\xd8\xff":
        # Some encoders pad after the end-of-image marker, so look for it near the end.
        return None if b"\xff\xd9" in tail else "truncated JPEG (no end-of-image marker)"
    if head == b"\x89PNG\r\n\x1a\n":
        return None if b"IEND" in tail else "truncated PNG (no IEND chunk)"
    return "not a JPEG or PNG image"


def scan_folder(task: tuple[str, dict]) -> list[tuple[str, int, int, str | None]]:
    """(name, size, mtime_ns, reason) of every entry of a class folder named like an image; `known` holds
    the verdicts of an earlier scan, reused for files whose size and mtime did not change."""
    folder, known = task
    entries = []
    for entry in os.scandir(folder):
        if os.path.splitext(entry.name)[1].lower() not in IMAGE_EXTENSIONS:
            continue
        try:
            stat = entry.stat()
        except OSError:
            entries.append((entry.name, -1, -1, "broken symbolic link"))
            continue
        if not entry.is_file():
            reason = "a directory, not an image file"
        else:
            old = known.get(entry.name)
            same = old is not None and old[0] == stat.st_size and old[1] == stat.st_mtime_ns
            reason = old[2] if same else check_image(entry.path, stat.st_size)
        entries.append((entry.name, stat.st_size, stat.st_mtime_ns, reason))
    return sorted(entries)


def decode_error(path: str) -> str | None:
    if not os.path.exists(path):
        return "deleted since the dataset was indexed"
    try:
        with Image.open(path) as image:
            image.load()
    except Exception as exc:  # noqa: BLE001 - PIL reports broken data in several exception types
        return f"cannot decode ({exc})"
    return None
