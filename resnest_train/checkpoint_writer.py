"""Checkpoint saves that do not stall training: the ranks wait only for a host copy of the state
(`snapshot`); rank 0 writes it in a background thread (`CheckpointWriter`) through
`checkpoint.save_checkpoint`, so the file is as atomic, fsynced and linked as a synchronous save.

How the runner uses it (rank 0 holds the writer; every rank takes part in the broadcasts):

    writer = CheckpointWriter(config.output_dir, keep_last=config.checkpoint.keep_last)   # once per run
    # at each save, after gathering every rank's RNG and data state:
    error = None
    if dist.is_main:
        try:
            writer.submit(snapshot(state), is_best=is_best)  # waits for the previous write, raises its error
        except UserError as exc:
            error = str(exc)
    error = broadcast_object(error, dist)                    # one `error:` line on every rank, as today
    # before stopping (a signal), before any exit and at the end of the run: the same with `writer.wait()`.

A write that fails is reported at the next `submit` or `wait`, with the message a synchronous save gives
("cannot write checkpoint ...: reason (the previous checkpoint is intact)"): the previous checkpoint is
on disk, the failed write left no temporary file, so the run loses only the steps since that checkpoint,
as a failed synchronous save does. Host memory: up to two copies of the state while a write is in flight
(the one being written, the one just taken); on CUDA the copies are pinned, and torch's caching host
allocator keeps those blocks for the next save.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from resnest_train.checkpoint import save_checkpoint

log = logging.getLogger("resnest_train")


def snapshot(state: dict) -> dict:
    """A copy of a nested state (dicts, lists, tuples, tensors, plain values) whose tensors live in new host
    memory, detached: training may change the live tensors as soon as this returns. Device tensors are
    copied into pinned buffers without blocking, then each device is synchronized once (one wait for all
    copies instead of one per tensor); host tensors take the same path, where the copy is synchronous."""
    devices: set[torch.device] = set()
    copied = _copy(state, devices)
    for device in devices:
        torch.get_device_module(device).synchronize(device)
    return copied


def _copy(value, devices: set[torch.device]):
    if isinstance(value, torch.Tensor):
        on_device = value.device.type != "cpu"
        if on_device:
            devices.add(value.device)
        host = torch.empty(value.shape, dtype=value.dtype, pin_memory=on_device)
        return host.copy_(value.detach(), non_blocking=on_device)
    if isinstance(value, dict):
        # state_dict() returns an OrderedDict whose `_metadata` (module versions) load_state_dict reads.
        kind = OrderedDict if isinstance(value, OrderedDict) else dict
        copied = kind((key, _copy(item, devices)) for key, item in value.items())
        if hasattr(value, "_metadata"):
            copied._metadata = _copy(value._metadata, devices)
        return copied
    if isinstance(value, (list, tuple)):
        return type(value)(_copy(item, devices) for item in value)
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

    @property
    def in_flight(self) -> bool:
        """A write is running (never blocks)."""
        return self._in_flight is not None and not self._in_flight.done()

    def submit(self, state: dict, *, is_best: bool) -> None:
        """Wait for the write in flight (raising its error), then start writing `state`, which must be a
        `snapshot`: the thread writes it while the caller goes on changing the live tensors."""
        self.wait()
        self._in_flight = self._pool.submit(self._write, state, is_best)

    def wait(self) -> Path | None:
        """Block until the write in flight is on disk; its `last.pt`, or None when nothing was in flight.
        A failed write raises here (CheckpointError for an unwritable file), once."""
        future, self._in_flight = self._in_flight, None
        return None if future is None else future.result()

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
        log.info("saved %s (epoch %d, step %d)", path, state["epoch"], state["step"])
        return path
