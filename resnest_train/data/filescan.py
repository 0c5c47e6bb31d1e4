"""The per-file work of the dataset index (index.py): list a class folder or a webdataset tar shard, check
each image's header and end, fully decode one on demand. Only the standard library and PIL: the scan's pool
spawns fresh interpreters that import just this module (forking a process that runs gloo or DALI threads
can deadlock).
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

from PIL import Image

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png"}
MAX_CLASS_INDEX = 2**31 - 1  # labels are int32 arrays (samples.py)


class ScanError(Exception):
    """A shard or file the index cannot list (index.py reports it as a dataset error, naming it)."""


def check_image(path: Path | str, size: int | None = None, start: int = 0, fd: int | None = None) -> str | None:
    """Return why `path` (or the `size` bytes at `start` of the open file `fd`, an image inside a shard) is
    not a usable image, or None. Reads only its first and last bytes."""
    try:
        own = fd is None
        fd = os.open(path, os.O_RDONLY) if own else fd
        try:
            size = os.fstat(fd).st_size if size is None else size
            if size == 0:
                return "empty file"
            head = os.pread(fd, 8, start)
            tail = os.pread(fd, 64, start + max(0, size - 64))
        finally:
            if own:
                os.close(fd)
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    return image_verdict(head, tail)


def image_verdict(head: bytes, tail: bytes) -> str | None:
    """Why an image with these first 8 and last 64 bytes is not usable, or None."""
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
        if _not_utf8(entry.name):
            raise ScanError(f"{folder}: file name {os.fsencode(entry.name)!r} is not UTF-8: rename the file")
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


def _sample_key(name: str) -> tuple[str, str]:
    """webdataset's split of a member name: the key is the path up to the first dot of the base name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def scan_shard(path: str) -> tuple[int, int, list[tuple[str, int, int, int, str | None]]]:
    """(size, mtime_ns, samples) of a local webdataset tar shard (`scan_tar`)."""
    stat = os.stat(path)
    with open(path, "rb") as raw:
        return stat.st_size, stat.st_mtime_ns, scan_tar(FileReader(raw, stat.st_size))


class FileReader:
    """A local shard as `scan_tar` reads it: `pread`, its `size` and `name`, a file object for tarfile."""

    def __init__(self, raw, size: int):
        self.raw, self.size, self.name = raw, size, raw.name

    def pread(self, size: int, offset: int) -> bytes:
        return os.pread(self.raw.fileno(), size, offset)

    def fileobj(self):
        self.raw.seek(0)
        return self.raw


def scan_tar(reader) -> list[tuple[str, int, int, int, str | None]]:
    """The samples of a webdataset tar shard read through `reader` (a local file, or a remote object read by
    byte ranges: store.RangeReader); each sample (image member name, data offset, size, label, reason) in
    the order of the tar, from its image (.jpg/.jpeg/.png) and its `.cls` member (the class index as text,
    the public ImageNet-1k webdataset layout). Headers are read and data skipped: only the `.cls` members
    and each image's first and last bytes are read. A shard that is not whole (cut short, empty, not a tar)
    adds a last sample named "" whose reason says so; a key used twice is a `ScanError` (webdataset itself
    refuses it)."""
    images, labels, order = {}, {}, []
    members, problem = _tar_members(reader)
    for name, start, size in members:
        key, ext = _sample_key(name)
        if "." + ext in IMAGE_EXTENSIONS:
            if key in images:
                raise ScanError(f"{reader.name}: two images for the sample key {key!r} ({images[key][0]} and "
                                f"{name}): webdataset keys must be unique in a shard")
            order.append(key)
            images[key] = (name, start, size)
        elif ext == "cls":
            if key in labels:
                raise ScanError(f"{reader.name}: the sample key {key!r} has two .cls members")
            labels[key] = reader.pread(size, start)
    samples = [_shard_sample(reader, images[key], labels.get(key)) for key in order]
    if problem:
        samples.append(("", 0, 0, -1, f"{problem}; {len(samples)} samples before it are used"))
    return samples


def _member_name(path: str, raw_name: bytes) -> str:
    try:
        return raw_name.decode()
    except UnicodeDecodeError:
        raise ScanError(f"{path}: member name {raw_name!r} is not UTF-8: repack the shard with UTF-8 names") from None


def _tar_members(reader) -> tuple[list[tuple[str, int, int]], str | None]:
    """(name, data offset, size) of every regular file in a tar, and why the tar is not whole (or None).
    Plain ustar/GNU headers are parsed here (tarfile's own parser is most of a scan's time at ImageNet's
    2.6M members); a tar with anything else (pax headers, GNU long names, numbers in base 256) is listed by
    tarfile. A tar ends with zero blocks: a shard that ends without them, or inside a member, was cut short
    (an interrupted copy)."""
    members, offset, file_size = [], 0, reader.size
    if file_size == 0:
        return [], "empty shard (0 bytes)"
    while True:
        header = reader.pread(512, offset)
        if len(header) < 512:
            return members, CUT_SHORT + " (no end-of-archive blocks)"
        if header == bytes(512):
            return members, None
        kind, size_field = header[156:157], header[124:136]
        if kind not in (b"0", b"\0") or size_field[0] & 0x80 or header[257:262] != b"ustar":
            if kind in (b"1", b"2", b"3", b"4", b"5", b"6", b"7") and header[257:262] == b"ustar":
                offset += 512  # links, devices, folders: no data to list
                continue
            return _tarfile_members(reader)
        size = int(size_field.strip(b"\0 ") or b"0", 8)
        name = _member_name(reader.name, header[:100].split(b"\0", 1)[0])
        prefix = _member_name(reader.name, header[345:500].split(b"\0", 1)[0])
        name = f"{prefix}/{name}" if prefix else name
        if offset + 512 + size > file_size:
            return members, f"{CUT_SHORT} inside member {name}"
        members.append((name, offset + 512, size))
        offset += 512 + -(-size // 512) * 512


CUT_SHORT = "shard cut short (an interrupted copy?): the samples after its end are missing"


def _tarfile_members(reader) -> tuple[list[tuple[str, int, int]], str | None]:
    members, file_size = [], reader.size
    try:
        with tarfile.open(fileobj=reader.fileobj(), mode="r:") as tar:
            for member in iter(tar.next, None):
                if member.offset_data + member.size > file_size:
                    return members, f"{CUT_SHORT} inside member {member.name}"
                if member.isfile():
                    members.append((_member_name(reader.name, member.name.encode(errors="surrogateescape")),
                                    member.offset_data, member.size))
            end = tar.offset
    except tarfile.ReadError as exc:
        if not members:
            return [], f"not a tar archive ({exc})"
        return members, f"{CUT_SHORT} ({exc})"
    # tarfile stops quietly where the file ends at a block boundary: the end-of-archive block must be there
    whole = reader.pread(512, end) == bytes(512)
    return members, None if whole else CUT_SHORT + " (no end-of-archive blocks)"


def _shard_sample(reader, image: tuple[str, int, int], label: bytes | None):
    name, start, size = image
    try:
        value = int(label.decode().strip()) if label is not None else -1
    except ValueError:
        value = -1
    if value > MAX_CLASS_INDEX:
        return name, start, size, -1, f"class index {value} in its .cls member is too large"
    try:
        reason = image_verdict(reader.pread(8, start), reader.pread(64, start + max(0, size - 64))) if size \
            else "empty file"
    except OSError as exc:
        reason = f"unreadable ({exc.strerror or exc})"
    if reason is None and value < 0:
        reason = "no class index (.cls member missing or not a number)"
    return name, start, size, value, reason


def _not_utf8(name: str) -> bool:
    try:
        name.encode()
    except UnicodeEncodeError:
        return True
    return False


def decode_bytes_error(data: bytes) -> str | None:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except Exception as exc:  # noqa: BLE001 - PIL reports broken data in several exception types
        return f"cannot decode ({exc})"
    return None


def scan_unit(task: tuple[str, bool, dict]) -> tuple[tuple[int, int], list[tuple]]:
    """One unit of the index (a class folder, or a shard when `shard`), as ((mtime_ns, size), rows of
    (name, size, mtime_ns, start, label, reason)); a folder reuses `known`'s verdicts of unchanged files."""
    path, shard, known = task
    if shard:
        size, mtime, samples = scan_shard(path)
        return (mtime, size), [(name, size_, -1, start, label, reason) for name, start, size_, label, reason in samples]
    stamp = (os.stat(path).st_mtime_ns, 0)
    return stamp, [(name, size, mtime, -1, -1, reason) for name, size, mtime, reason in scan_folder((path, known))]
