"""Checkpoint saves that do not stall training: the ranks wait only for a host copy of the state
(`snapshot`); rank 0 writes it in a background thread (`CheckpointWriter`) through
`checkpoint.save_checkpoint`, so the file is as atomic, fsynced and linked as a synchronous save.

How the runner uses it (rank 0 holds the writer; `agreement.rank0_acts` hands the outcome to every rank):

    writer = CheckpointWriter(config.output_dir, keep_last=config.checkpoint.keep_last)   # once per run
    rank0_acts(lambda: writer.save(state, is_best=is_best), dist)   # at each save
    failed = writer.check()                                          # rank 0, after every optimizer step
    rank0_acts(writer.wait, dist)   # when the ranks agree that it failed, before stopping, at the end

A write that fails is seen at the next optimizer step (`check`, which never blocks), not at the next save:
the newest snapshot is written once more right then (a transient fault, an NFS hiccup, costs nothing), and
only if that fails too does the run stop, at the ranks' next stop agreement (every step on one process,
every 10 under DDP: rank 0 alone must not stop while the others wait in a collective), with the message
of a synchronous save ("cannot write checkpoint
...: reason (the previous checkpoint is intact)"): the previous checkpoint is on disk and no temporary file
is left, so the run loses only the steps since that checkpoint. Host memory: one staging copy of the state,
reused by every save (`save` waits for the write in flight before copying into it; on CUDA it is pinned
once), instead of a new copy per save and two while a write is in flight.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from resnest_train.checkpoint.files import CheckpointError, save_checkpoint
from resnest_train.checkpoint.format import position_of

log = logging.getLogger("resnest_train")


def snapshot(state: dict, reuse: dict | None = None) -> dict:
    """A copy of a nested state (dicts, lists, tuples, tensors, plain values) whose tensors live in host
    memory of their own, detached: training may change the live tensors as soon as this returns. `reuse`: an
    earlier snapshot nobody reads any more, whose tensors are copied into where shape and dtype match (the
    staging buffer). Device tensors are copied into pinned buffers without blocking, then each device is
    synchronized once (one wait for all copies instead of one per tensor)."""
    devices: set[torch.device] = set()
    copied = _copy(state, devices, iter(_tensors(reuse)))
    for device in devices:
        torch.get_device_module(device).synchronize(device)
    return copied


def _tensors(value) -> list[torch.Tensor]:
    """The tensors of a nested state, in the order `_copy` meets them."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        found = [t for item in value.values() for t in _tensors(item)]
        return found + (_tensors(value._metadata) if hasattr(value, "_metadata") else [])
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return []


def _copy(value, devices: set[torch.device], buffers):
    if isinstance(value, torch.Tensor):
        on_device = value.device.type != "cpu"
        if on_device:
            devices.add(value.device)
        host = next(buffers, None)
        if host is None or host.shape != value.shape or host.dtype != value.dtype or host.is_pinned() != on_device:
            host = torch.empty(value.shape, dtype=value.dtype, pin_memory=on_device)
        return host.copy_(value.detach(), non_blocking=on_device)
    if isinstance(value, dict):
        # state_dict() returns an OrderedDict whose `_metadata` (module versions) load_state_dict reads.
        kind = OrderedDict if isinstance(value, OrderedDict) else dict
        copied = kind((key, _copy(item, devices, buffers)) for key, item in value.items())
        if hasattr(value, "_metadata"):
            copied._metadata = _copy(value._metadata, devices, buffers)
        return copied
    if isinstance(value, (list, tuple)):
        return type(value)(_copy(item, devices, buffers) for item in value)
    return value  # str, int, float, bool, None, bytes: immutable


class CheckpointWriter:
    """One checkpoint write at a time, in a background thread. `submit`, `wait` and `close` are called
    from one thread (the training loop's). The worker thread is not a daemon: a process that exits while
    a write is in flight finishes that write first (concurrent.futures joins its threads at exit)."""

    def __init__(self, output_dir: str | Path, *, keep_last: int):
        self.output_dir = Path(output_dir)
        self.keep_last = keep_last
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self._in_flight: Future | None = None
        self._job: tuple[dict, bool] | None = None  # the snapshot being written, to write again
        self._staging: dict | None = None  # the host copy every `save` reuses
        self._failed: CheckpointError | None = None  # a write that failed twice, raised by the next `wait`

    @property
    def in_flight(self) -> bool:
        """A write is running (never blocks)."""
        return self._in_flight is not None and not self._in_flight.done()

    def save(self, state: dict, *, is_best: bool) -> None:
        """Wait for the write in flight (raising its error), copy the live `state` into the staging buffer,
        and start writing it: the caller may change the live tensors as soon as this returns."""
        self.wait()
        self._staging = snapshot(state, reuse=self._staging)
        self.submit(self._staging, is_best=is_best)

    def submit(self, state: dict, *, is_best: bool) -> None:
        """Wait for the write in flight (raising its error), then start writing `state`, which must be a
        `snapshot`: the thread writes it while the caller goes on changing the live tensors."""
        self.wait()
        self._job = (state, is_best)
        self._in_flight = self._pool.submit(self._write, state, is_best)

    def check(self) -> bool:
        """Never blocks (unless a write failed): a write that has failed is written again now; True when
        that failed too. The error is then raised by the next `wait` (or `save`), which every rank reaches
        together (runner: the stop agreement), never from here: the other ranks may be in a collective."""
        if self._in_flight is not None and self._in_flight.done() and self._in_flight.exception() is not None:
            try:
                self.wait()
            except CheckpointError as exc:
                self._failed = exc
        return self._failed is not None

    def wait(self) -> Path | None:
        """Block until the write in flight is on disk; its `last.pt`, or None when nothing was in flight.
        A failed write is written once more, here; a second failure raises (CheckpointError), once."""
        failed, self._failed = self._failed, None
        if failed is not None:
            raise failed
        future, self._in_flight = self._in_flight, None
        if future is None:
            return None
        try:
            return future.result()
        except CheckpointError as first:
            log.warning("%s; writing it again", first)
            return self._write(*self._job)

    def close(self) -> None:
        """Wait for the write in flight (raising its error), then stop the thread."""
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc is None:
            self.close()
            return
        try:  # keep the exception already on its way; the write's own failure goes to the log
            self.close()
        except Exception as write_error:  # noqa: BLE001 - any failure of the write, reported not raised
            log.error("%s", write_error)

    def _write(self, state: dict, is_best: bool) -> Path:
        path = save_checkpoint(state, self.output_dir, keep_last=self.keep_last, is_best=is_best)
        log.info("saved %s (epoch %d, step %d)", path, *position_of(state))
        return path
