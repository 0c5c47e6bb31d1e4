#!/usr/bin/env python
"""Serve a local folder over HTTP on 127.0.0.1, with byte ranges, as a shard host or a CDN would: the tests'
and the benchmark's `https://`-like data root (`http://127.0.0.1:PORT/`).

    python scripts/shard_server.py FOLDER [--port 0] [--latency 0.1] [--bandwidth 50e6] [--fail FILE]

Python's own http.server answers a Range request with the whole file; this one answers `206 Partial
Content`, gives an `ETag` (size and mtime, as nginx does), and can add a latency per request and a bandwidth
cap. `--fail FILE` names a JSON file read at each request,
`{"status": 503, "count": 3, "match": "train/", "method": "GET"}`: the next `count` requests (of
`method`, where given) whose path holds `match` are answered `status` (throttling, an outage, a 403).
`--no-listing`: folders are not listed (404), as on a CDN.
It prints `port N` once listening, and the bytes it sent, per path, to `--log` (JSON) at each request.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer


class RangeHandler(SimpleHTTPRequestHandler):
    latency, bandwidth, fail_file, log_file, listing = 0.0, 0.0, None, None, True
    sent: dict[str, int] = {}
    lock = threading.Lock()

    def log_message(self, *args) -> None:  # quiet: the tests read their own output
        pass

    def _injected_failure(self) -> bool:
        if not self.fail_file or not os.path.exists(self.fail_file):
            return False
        with self.lock:
            with open(self.fail_file) as file:
                rule = json.load(file)
            if rule.get("count", 0) <= 0 or rule.get("match", "") not in self.path \
                    or rule.get("method", self.command) != self.command:
                return False
            rule["count"] -= 1
            with open(self.fail_file, "w") as file:
                json.dump(rule, file)
        self.send_error(int(rule["status"]))
        return True

    def send_head(self):
        time.sleep(self.latency)
        if self._injected_failure():
            return None
        path = self.translate_path(self.path)
        if os.path.isdir(path) and not self.listing:  # a CDN or a hub: nothing can be listed
            self.send_error(404)
            return None
        if os.path.isdir(path) or "Range" not in self.headers:
            return super().send_head()
        try:
            file = open(path, "rb")
        except OSError:
            self.send_error(404)
            return None
        size = os.fstat(file.fileno()).st_size
        start, _, end = self.headers["Range"].removeprefix("bytes=").partition("-")
        start, end = int(start or 0), min(int(end) if end else size - 1, size - 1)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        file.seek(start)
        self.remaining = end - start + 1
        return file

    def end_headers(self) -> None:
        path = self.translate_path(self.path)
        if os.path.isfile(path):  # a file, whole or a range: an ETag from its size and mtime, as nginx gives
            stat = os.stat(path)
            self.send_header("ETag", f'"{stat.st_size:x}-{stat.st_mtime_ns:x}"')
            self.send_header("Accept-Ranges", "bytes")
        super().end_headers()

    def copyfile(self, source, outputfile) -> None:
        remaining = getattr(self, "remaining", None)
        chunk = 1 << 16
        while remaining is None or remaining > 0:
            data = source.read(chunk if remaining is None else min(chunk, remaining))
            if not data:
                break
            self._count(len(data))  # before the write: a client that has the bytes finds them counted
            outputfile.write(data)
            if remaining is not None:
                remaining -= len(data)
            if self.bandwidth:
                time.sleep(len(data) / self.bandwidth)

    def _count(self, size: int) -> None:
        with self.lock:
            self.sent[self.path] = self.sent.get(self.path, 0) + size
            if self.log_file:
                with open(self.log_file + ".tmp", "w") as file:
                    json.dump(self.sent, file)
                os.replace(self.log_file + ".tmp", self.log_file)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to each request")
    parser.add_argument("--bandwidth", type=float, default=0.0, help="bytes per second per request (0: no cap)")
    parser.add_argument("--fail", help="a JSON file of failures to inject (see the module's docstring)")
    parser.add_argument("--no-listing", action="store_true", help="answer 404 for folders")
    parser.add_argument("--log", help="a JSON file of the bytes sent per path, rewritten at each request")
    args = parser.parse_args(argv)
    RangeHandler.latency, RangeHandler.bandwidth = args.latency, args.bandwidth
    RangeHandler.fail_file, RangeHandler.log_file, RangeHandler.listing = args.fail, args.log, not args.no_listing
    ThreadingHTTPServer.request_queue_size = 256  # clients open many connections at once (socketserver's 5 drops them)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), partial(RangeHandler, directory=args.folder))
    print(f"port {server.server_address[1]}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
