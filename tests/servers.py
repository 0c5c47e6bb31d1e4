"""Object stores for the tests, on 127.0.0.1 only: an HTTP shard host (scripts/shard_server.py: byte ranges,
ETags, injected failures, bytes sent per path) and a real S3 endpoint (moto's server mode, which s3fs's own
tests use). No network, no credentials: moto accepts any key."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from tests.conftest import ROOT, free_port

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


class HttpStore:
    def __init__(self, url: str, log: Path, fail: Path):
        self.url, self.log, self.fail = url, log, fail

    def sent(self, match: str = ".tar") -> int:
        """Bytes of bodies sent so far for the paths holding `match`."""
        counts = json.loads(self.log.read_text()) if self.log.exists() else {}
        return sum(size for path, size in counts.items() if match in path)

    def inject(self, status: int, count: int, match: str = "", method: str | None = None) -> None:
        rule = {"status": status, "count": count, "match": match, **({"method": method} if method else {})}
        self.fail.write_text(json.dumps(rule))

    def remaining(self) -> int:
        return json.loads(self.fail.read_text())["count"]


@contextmanager
def http_store(folder: Path, work: Path, *extra: str):
    """`folder` served at `HttpStore.url` until the block ends."""
    work.mkdir(parents=True, exist_ok=True)
    log, fail = work / "sent.json", work / "fail.json"
    server = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "shard_server.py"), str(folder), "--log",
                               str(log), "--fail", str(fail), *extra], stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline().split()[1])
        yield HttpStore(f"http://127.0.0.1:{port}", log, fail)
    finally:
        server.terminate()
        server.wait(10)


@contextmanager
def s3_store():
    """A moto S3 server; yields the environment a process reaches it with (AWS_ENDPOINT_URL and keys)."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(endpoint, timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        yield {**S3_ENV, "AWS_ENDPOINT_URL": endpoint}
    finally:
        server.terminate()
        server.wait(10)


def upload(env: dict, folder: Path, target: str) -> str:
    """`folder`'s files to `s3://target` (bucket/prefix; the bucket made); the root URL."""
    import boto3
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    bucket, _, prefix = target.partition("/")
    if bucket not in [entry["Name"] for entry in client.list_buckets().get("Buckets", [])]:
        client.create_bucket(Bucket=bucket)
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder)}".lstrip("/"))
    return f"s3://{target}"
