"""Rank 0 acts, every rank learns the outcome: the one primitive for work only rank 0 does (the run folder,
the resume decision, the dataset index, a checkpoint write) while the other ranks wait for it.

`rank0_acts(act, dist)` runs `act()` on rank 0 alone and hands every rank its result, or, when it raised
anything at all (the project's UserError, an OSError of the filesystem, a bug), the same UserError on
every rank, so that each prints the same `error:` line and exits 2 instead of waiting in a collective
that rank 0 never reaches; `errors.describe` words the exception as that line.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable
from typing import TypeVar

from resnest_train.cluster.distributed import DistInfo, announce_failure, broadcast_object, failure_of_another_rank
from resnest_train.errors import UserError, describe

log = logging.getLogger("resnest_train")
T = TypeVar("T")


def rank0_acts(act: Callable[[], T], dist: DistInfo, *, timeout: datetime.timedelta | None = None) -> T:
    """`act()` on rank 0, its result on every rank; whatever `act` raised, the same UserError on every
    rank. `timeout`: how long the others may wait for rank 0 (a first dataset scan outlasts the process
    group's timeout). The result must be picklable; what only rank 0 needs stays in `act`'s closure."""
    result, error = None, None
    if dist.is_main:
        try:
            result = act()
        except Exception as exc:  # noqa: BLE001 - every outcome reaches every rank, as one line
            if not isinstance(exc, UserError):
                log.debug("rank 0 failed", exc_info=exc)  # a bug's traceback stays in the debug log
            error = exc if isinstance(exc, UserError) and _picklable(exc) else UserError(describe(exc))
    if dist.distributed:
        result, error = broadcast_object((result, error), dist, timeout=timeout)
    if error is not None:
        raise error
    return result


def stop_every_rank(exc: Exception, dist: DistInfo, *, record: Callable[[list[str]], None]) -> BaseException:
    """What to raise on this rank when `exc` ended its run; the other ranks must stop too, not wait in a
    collective for this one. This rank's own failure (its decoder's, its filesystem's, a bug) is left where
    the others read it (`announce_failure`); a collective that failed because another rank stopped first
    becomes that rank's line. Rank 0 `record`s the undecodable training files either names (their `paths`).
    A UserError or OSError is one `error:` line; a bug of ours keeps its traceback."""
    if isinstance(exc, RuntimeError) and not isinstance(exc, UserError):
        announced = failure_of_another_rank(dist)
        if announced is not None:
            reason, files = announced
            _record(record, files, dist)
            return UserError(reason)
    files = list(getattr(exc, "paths", []))
    _record(record, files, dist)
    if _lost_peer(exc):  # a collective failed and no rank said why (one killed, or too slow to say)
        exc = UserError(f"rank {dist.rank} lost its connection to another process of this run, which stopped "
                        f"without a reason this rank could read (see that process's log): {describe(exc)}")
    announce_failure(dist, describe(exc), files)
    if isinstance(exc, (UserError, OSError)):
        return exc if isinstance(exc, UserError) else UserError(describe(exc))
    return exc


def _lost_peer(exc: Exception) -> bool:
    """A collective that failed because its peer went away (gloo's and NCCL's wording)."""
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        marker in text for marker in ("Connection closed by peer", "Connection reset by peer", "NCCL communicator",
                                      "remote process exited", "Broken pipe"))


def _record(record: Callable[[list[str]], None], files: list[str], dist: DistInfo) -> None:
    if dist.is_main and files:
        try:
            record(files)
        except OSError as exc:  # the run is failing already: its own line matters more
            log.warning("could not record the undecodable files %s: %s", files, describe(exc))


def _picklable(exc: UserError) -> bool:
    """A UserError travels as itself (its subclass kept) when it rebuilds from its one message."""
    return len(exc.args) == 1 and isinstance(exc.args[0], str)

