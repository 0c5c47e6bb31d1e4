"""Data in an object store: `data.root` as `s3://bucket/prefix`, `gs://bucket/prefix` or `http(s)://host/path`,
read through fsspec (s3fs, gcsfs, its HTTP file system), each failure worded as one line.

Credentials and endpoints come from each ecosystem's own environment (botocore reads `AWS_*`, including
`AWS_ENDPOINT_URL` for a local or private S3 server; gcsfs reads `GOOGLE_APPLICATION_CREDENTIALS`): nothing
here names them. Only shards are read from a store (an object per image is the slow case every streaming
library warns about). Every request goes through `attempt`: a throttled or dropped request (HTTP 429 or 5xx,
a reset connection, a timeout) is tried again with a growing pause, a bounded number of times; a missing
object or a refusal (403) is not retried. What fails is a `StoreError` naming the object and why.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from functools import cache

from resnest_train.errors import UserError

SCHEMES = ("s3://", "gs://", "gcs://", "http://", "https://")
PACKAGES = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "http": "aiohttp", "https": "aiohttp"}
# botocore says at INFO where it found credentials and endpoints, on every rank: kept for --verbose runs
for _name in ("botocore", "aiobotocore", "s3fs", "fsspec"):
    logging.getLogger(_name).setLevel(logging.WARNING)
MISSING = "no such object"
RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0)  # seconds between the tries of a throttled or dropped request
TIMEOUTS = {"connect": 10, "read": 60}  # seconds: a store that does not answer is a failure, not a hang


class StoreError(UserError):
    """An object store could not give what was asked (unreachable, missing, refused, changed)."""


class NoSuchObject(StoreError):
    """The object asked for does not exist (HTTP 404)."""


def is_remote(root) -> bool:
    return isinstance(root, str) and root.startswith(SCHEMES)


def join(root: str, *parts: str) -> str:
    """`root/part/...` for a URL (pathlib would fold its `//`)."""
    return "/".join([root.rstrip("/"), *(part.strip("/") for part in parts)])


def under(root, *parts: str) -> str:
    """A path below the data root, local or remote, as messages name it."""
    return join(root, *parts) if is_remote(root) else os.path.join(root, *parts)


@cache
def filesystem(protocol: str):
    """The fsspec file system of `protocol`, with timeouts; one per process (fsspec caches instances per
    process and renews them after a fork)."""
    import fsspec
    options = {}
    if protocol == "s3":
        options = {"config_kwargs": {"connect_timeout": TIMEOUTS["connect"], "read_timeout": TIMEOUTS["read"],
                                     "retries": {"max_attempts": 1}}}  # retried here, with the others
    elif protocol in ("http", "https"):
        import aiohttp
        options = {"client_kwargs": {"timeout": aiohttp.ClientTimeout(sock_connect=TIMEOUTS["connect"],
                                                                      sock_read=TIMEOUTS["read"])}}
    try:
        return fsspec.filesystem(protocol, **options)
    except ImportError:
        raise StoreError(f"reading {protocol}:// needs the package {PACKAGES.get(protocol, protocol)}: "
                         f"pip install {PACKAGES.get(protocol, protocol)}") from None


os.register_at_fork(after_in_child=filesystem.cache_clear)  # a forked worker makes its own (fsspec's loop)


def fs_of(url: str):
    return filesystem(url.split("://", 1)[0])


def _status(exc: BaseException | None) -> int | None:
    """The HTTP status of a failed request, where the exception or its cause carries one (fsspec's HTTP
    file system raises FileNotFoundError from a HEAD answered 403 or 503)."""
    while exc is not None:
        for name in ("status", "code"):
            value = getattr(exc, name, None)
            if isinstance(value, int) and 100 <= value < 600:
                return value
        response = getattr(exc, "response", None)  # botocore's ClientError
        if isinstance(response, dict) and response.get("ResponseMetadata", {}).get("HTTPStatusCode"):
            return response["ResponseMetadata"]["HTTPStatusCode"]
        exc = exc.__cause__ or exc.__context__
    return None


def _verdict(exc: BaseException) -> tuple[bool, str]:
    """(worth another try, why in words) for a failed request."""
    status = _status(exc)
    if status == 404 or (isinstance(exc, FileNotFoundError) and status is None):
        return False, MISSING
    if isinstance(exc, PermissionError) or status in (401, 403):
        return False, "access denied (HTTP 403): check the credentials (AWS_*, GOOGLE_APPLICATION_CREDENTIALS)"
    if status == 429 or (status is not None and status >= 500):
        return True, f"the store answered HTTP {status} (throttled or unavailable)"
    if status is not None:
        return False, f"the store answered HTTP {status}"
    if isinstance(exc, (OSError, TimeoutError)) or "Timeout" in type(exc).__name__ \
            or "Connect" in type(exc).__name__:
        return True, f"unreachable ({type(exc).__name__}: {exc})".replace("\n", " ")
    return True, f"{type(exc).__name__}: {exc}".replace("\n", " ")


def attempt(what: str, call, *args, delays: tuple[float, ...] | None = None, **kwargs):
    """`call(*args, **kwargs)`, tried again after each of `delays` (RETRY_DELAYS) while its failure is
    transient; a `StoreError` naming `what` when it still fails."""
    delays = RETRY_DELAYS if delays is None else delays
    for tries, delay in enumerate((*delays, None), start=1):
        try:
            return call(*args, **kwargs)
        except StoreError:
            raise
        except Exception as exc:  # noqa: BLE001 - fsspec back ends raise their own exception types
            again, why = _verdict(exc)
            if not again or delay is None:
                tried = f"; tried {tries} times" if tries > 1 else ""
                kind = NoSuchObject if why == MISSING else StoreError
                raise kind(f"cannot read {what}: {why}{tried}") from None
            time.sleep(delay)
    raise AssertionError("unreachable")


def stamp_of(info: dict) -> tuple[int, int]:
    """(a 63-bit digest of the object's ETag, or of its modification time, size): the index's stamp of a
    remote shard, as (mtime_ns, size) is of a local one."""
    tag = info.get("ETag") or info.get("etag") or info.get("LastModified") or info.get("Last-Modified") \
        or info.get("mtime") or info.get("updated") or ""
    digest = int.from_bytes(hashlib.sha1(str(tag).strip('"').encode()).digest()[:8], "big") >> 1
    return digest, int(info.get("size") or 0)


def info(url: str) -> dict:
    return attempt(url, fs_of(url).info, url)


def stamps(urls: list[str], threads: int = 16) -> list[tuple[int, int]]:
    """The stamp of each object (one HEAD each, `threads` at once)."""
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(urls)))) as pool:
        return list(pool.map(lambda url: stamp_of(info(url)), urls))


def listing(folder: str) -> dict[str, dict]:
    """name -> info of the objects directly in `folder` (an empty dict where it holds none)."""
    fs = fs_of(folder)
    try:
        entries = attempt(folder, fs.ls, folder, detail=True)
    except NoSuchObject:
        return {}
    return {entry["name"].rstrip("/").rsplit("/", 1)[-1]: entry for entry in entries
            if entry.get("type", "file") == "file"}


def read_text(url: str) -> str | None:
    """The object's text, or None where there is no such object."""
    try:
        return attempt(url, fs_of(url).cat_file, url).decode("utf-8")
    except NoSuchObject:
        return None
    except UnicodeDecodeError as exc:
        raise StoreError(f"cannot read {url}: not UTF-8 text ({exc})") from None


def read_range(url: str, start: int, end: int) -> bytes:
    return attempt(url, fs_of(url).cat_file, url, start=start, end=end)


def download(url: str, destination: str) -> None:
    """The object into the local file `destination` (whole, or a `StoreError`)."""
    attempt(url, fs_of(url).get_file, url, destination)


class RangeReader:
    """A remote shard read by byte ranges for its index (filescan's tar walk). A request fetches `block`
    bytes from a little before the offset asked, and the last few windows are kept: the walk reads a member's
    header, and later its image's first and last bytes, so an image's tail, the `.cls` member after it and
    the next header usually come in one request: about one per sample, never the images' bytes."""

    # bytes fetched before the offset asked (an image's last 64 sit before the next header); windows kept: a
    # shard's whole walk (the image checks come after it; 4 KB per member, 16 MB at most)
    BEFORE, KEEP = 1024, 4096

    def __init__(self, url: str, size: int, block: int = 4096):
        self.name, self.size, self.block = url, size, block
        self.windows: dict[int, bytes] = {}  # start -> bytes, oldest first

    def pread(self, size: int, offset: int) -> bytes:
        end = min(offset + size, self.size)
        for start, data in self.windows.items():
            if start <= offset and end <= start + len(data):
                return data[offset - start:end - start]
        start = max(0, offset - self.BEFORE)
        data = read_range(self.name, start, min(self.size, max(end, start + self.block)))
        self.windows[start] = data
        if len(self.windows) > self.KEEP:
            del self.windows[next(iter(self.windows))]
        return data[offset - start:end - start]
