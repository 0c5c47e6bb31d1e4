"""Process-group setup from the torchrun environment: the only module that reads RANK / WORLD_SIZE or calls
`init_process_group`. NCCL for CUDA tensors, gloo for CPU tensors (and for every rank on CPU); a single
process needs no launcher.

GPU ranks initialise `cpu:gloo,cuda:nccl`, CPU ranks `gloo`: CPU-tensor collectives (the device check, the
objects sent from rank 0) then run on gloo everywhere, so a mixed cluster is caught with an error at start
instead of hanging in its first NCCL collective.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import socket
import time
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from resnest_train.errors import UserError

TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    failure_key: str = "resnest_train/failure/0"  # where a rank that stops alone leaves its reason

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def select_device(setting: str, local_rank: int) -> torch.device:
    """`train.device`: auto (CUDA when usable), cuda (an error when not usable), cpu."""
    usable = torch.cuda.is_available()
    if setting == "cuda" and not usable:
        raise UserError("train.device=cuda but CUDA is not usable here (no GPU visible, no driver, or a torch "
                        "build without CUDA); use train.device=auto or cpu")
    if setting == "cpu" or not usable:
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise UserError(f"process {local_rank} on this node has no GPU of its own: {count} visible "
                        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); start at most "
                        f"{count} processes per node (--nproc-per-node)")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def setup_distributed(device_setting: str = "auto") -> DistInfo:
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    device = select_device(device_setting, local_rank)
    dist = DistInfo(rank, local_rank, world_size, device)
    if dist.distributed and not torch_dist.is_initialized():
        # The rendezvous itself is torchrun's; env:// reads MASTER_ADDR/PORT that torchrun exports.
        if device.type == "cuda":
            torch_dist.init_process_group("cpu:gloo,cuda:nccl", timeout=TIMEOUT, device_id=device)
        else:
            torch_dist.init_process_group("gloo", timeout=TIMEOUT)
        check_same_device_type(dist)
        # Every process of this group joins once: the count names the group's round (an elastic restart
        # may reuse the rendezvous store), so a reason left by an earlier round is never read as this one's.
        try:
            joined = torch_dist.distributed_c10d._get_default_store().add("resnest_train/joined", 1)
            dist = dataclasses.replace(dist, failure_key=f"resnest_train/failure/{(joined - 1) // world_size}")
        except (RuntimeError, ValueError) as exc:  # no store to count on: a failure is then not announced
            logging.getLogger("resnest_train").debug("no rendezvous store: %s", exc)
    return dist


def check_same_device_type(dist: DistInfo) -> None:
    """Every rank must train on the same kind of device: NCCL and gloo ranks cannot meet in a collective."""
    mine = torch.tensor([1 if dist.device.type == "cuda" else 0])
    types = [torch.zeros_like(mine) for _ in range(dist.world_size)]
    torch_dist.all_gather(types, mine)  # CPU tensors: gloo on every rank
    cuda_ranks = [rank for rank, t in enumerate(types) if t.item() == 1]
    if cuda_ranks and len(cuda_ranks) < dist.world_size:
        cpu_ranks = sorted(set(range(dist.world_size)) - set(cuda_ranks))
        raise UserError(f"ranks {cpu_ranks} found no usable GPU while ranks {cuda_ranks} train on CUDA; every "
                        "node needs working GPUs (or set train.device=cpu everywhere)")


def all_reduce_sum(tensor: torch.Tensor, dist: DistInfo) -> torch.Tensor:
    """Sum across ranks (counts, never per-rank means), on the tensor's own device."""
    if dist.distributed:
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return tensor


def broadcast_object(value, dist: DistInfo, *, timeout: datetime.timedelta | None = None):
    """Rank 0's `value` on every rank. `timeout`: wait that long for rank 0 (in a group of its own), for
    work on rank 0 that may outlast the process group's timeout (a first dataset scan)."""
    if not dist.distributed:
        return value
    group = torch_dist.new_group(backend="gloo", timeout=timeout) if timeout else None
    holder = [value]
    torch_dist.broadcast_object_list(holder, src=0, group=group, device=torch.device("cpu"))
    if group is not None:
        torch_dist.destroy_process_group(group)
    return holder[0]


def scatter_object(values: list | None, dist: DistInfo):
    """values[rank] from rank 0 to each rank (the others pass None)."""
    if not dist.distributed:
        return values[0]
    out = [None]
    torch_dist.scatter_object_list(out, values if dist.is_main else None, src=0)
    return out[0]


def gather_object(value, dist: DistInfo) -> list | None:
    """Every rank's `value` on rank 0 (None elsewhere)."""
    if not dist.distributed:
        return [value]
    out = [None] * dist.world_size if dist.is_main else None
    torch_dist.gather_object(value, out, dst=0)
    return out


FAILURE_WAIT = 30.0  # seconds the failing rank waits for the others to read its reason (a dead rank never does)


LEAVE_WAIT = 10.0  # seconds rank 0 keeps the store up for the others' last calls


def _wait_for(store, key: str, count: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while store.add(key, 0) < count and time.monotonic() < deadline:
        time.sleep(0.05)


def _leave(store, dist: DistInfo) -> None:
    """This rank is done with the store. Without a launcher the store lives in rank 0's process: rank 0
    waits until the others are done with it, whose calls would otherwise fail as it exits (a C++ stack
    trace on stderr after the error line)."""
    if dist.is_main:
        _wait_for(store, f"{dist.failure_key}/left", dist.world_size - 1, LEAVE_WAIT)
    else:
        store.add(f"{dist.failure_key}/left", 1)


def _store_port(store) -> int | None:
    while store is not None and not hasattr(store, "port"):
        store = getattr(store, "underlying_store", None)
    return getattr(store, "port", None)


def tcp_connections():
    """This process's TCP sockets (Linux `/proc/self/fd`), each as a socket object that does not own its
    descriptor (detached after the caller's turn)."""
    for name in os.listdir("/proc/self/fd") if os.path.isdir("/proc/self/fd") else []:
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            sock = socket.socket(fileno=int(name))
        except OSError:  # closed meanwhile
            continue
        try:
            if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
                yield sock
        finally:
            sock.detach()


def _close_connections(store) -> None:
    """End this rank's connections to the other ranks now, so that a rank waiting for this one in a
    collective fails at once and reads the reason. `destroy_process_group` does not end them: DDP keeps a
    reference to the group, whose gloo connections then stay open until this process exits (measured: the
    others noticed only then, when the store rank 0 holds was gone with it). So every TCP connection of this
    process is shut down except the rendezvous store's (its port), which must stay up for the others to
    read the reason."""
    keep = _store_port(store)
    for sock in tcp_connections():
        try:
            if keep not in (sock.getsockname()[1], sock.getpeername()[1]):
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:  # a listening socket (no peer)
            continue


def announce_failure(dist: DistInfo, reason: str, files: list[str] = ()) -> None:
    """This rank stops on `reason` (an image its decoder failed on) while the others may be waiting for it
    in a collective: leave the reason in the rendezvous store, close this rank's connections (the others'
    collectives then fail at once instead of at the process group's timeout, and they read the reason),
    and wait until every rank has read it or stopped on its own (at most FAILURE_WAIT). `files`: the
    training images it could not decode, which rank 0 records in the run folder."""
    if not dist.distributed or not torch_dist.is_initialized():
        return
    store = torch_dist.distributed_c10d._get_default_store()
    try:
        store.compare_set(f"{dist.failure_key}/reason", "", reason + "\0" + "\n".join(files))  # the first kept
        store.add(f"{dist.failure_key}/ended", 1)
        _close_connections(store)
        torch_dist.destroy_process_group()
        _wait_for(store, f"{dist.failure_key}/ended", dist.world_size, FAILURE_WAIT)
        _leave(store, dist)
    except (RuntimeError, OSError) as exc:  # the store went away: nothing more to tell
        logging.getLogger("resnest_train").debug("could not announce the failure: %s", exc)


FAILURE_READ_WAIT = 5.0  # seconds: the failing rank may close its connections a moment before its reason lands


def failure_of_another_rank(dist: DistInfo) -> tuple[str, list[str]] | None:
    """After a collective failed: the reason another rank announced and the files it named, if any (and say
    it was read). The failing rank writes its reason and then closes its connections, but on a loaded
    machine this rank's collective can fail (connection closed) before the store answers with the reason:
    look for it for a few seconds before concluding that nobody announced one."""
    if not dist.distributed:
        return None
    deadline = time.monotonic() + FAILURE_READ_WAIT
    while True:
        try:
            store = torch_dist.distributed_c10d._get_default_store()
            if store.check([f"{dist.failure_key}/reason"]):
                reason, _, files = store.get(f"{dist.failure_key}/reason").decode().partition("\0")
                store.add(f"{dist.failure_key}/ended", 1)
                _leave(store, dist)
                return reason, files.splitlines()
        except (RuntimeError, OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            return None
        time.sleep(0.1)


def cleanup(dist: DistInfo) -> None:
    if dist.distributed and torch_dist.is_initialized():
        torch_dist.destroy_process_group()
