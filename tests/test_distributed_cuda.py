"""distributed.py's CUDA branches without a GPU: device selection per local rank, the NCCL process group
(`cpu:gloo,cuda:nccl`, its timeout, the device it binds), the mixed-cluster check, and the object broadcast
that waits on a gloo group of its own. torch.cuda and torch.distributed are replaced by recorders; what
NCCL itself does needs several GPUs (BENCHMARKS.md)."""

from __future__ import annotations

import datetime

import pytest
import torch

from resnest_train.cluster import distributed
from resnest_train.cluster.distributed import DistInfo, broadcast_object, select_device, setup_distributed
from resnest_train.errors import UserError


@pytest.fixture
def two_gpus(monkeypatch):
    """A node with 2 visible GPUs; returns the devices `torch.cuda.set_device` was given."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    return chosen


@pytest.fixture
def process_group(monkeypatch):
    """init_process_group and the device-type check recorded instead of run; returns the calls."""
    calls = {"init": [], "check": []}
    monkeypatch.setattr(distributed.torch_dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.torch_dist, "init_process_group",
                        lambda *args, **kwargs: calls["init"].append((args, kwargs)))
    monkeypatch.setattr(distributed, "check_same_device_type", calls["check"].append)
    return calls


def torchrun_env(monkeypatch, *, rank: int, local_rank: int, world_size: int) -> None:
    for name, value in (("RANK", rank), ("LOCAL_RANK", local_rank), ("WORLD_SIZE", world_size)):
        monkeypatch.setenv(name, str(value))


def test_each_local_rank_takes_its_own_gpu(two_gpus):
    assert select_device("auto", 1) == torch.device("cuda", 1)
    assert select_device("cuda", 0) == torch.device("cuda", 0)
    assert two_gpus == [1, 0]  # set before any CUDA work, so NCCL and the allocator use that GPU
    assert select_device("cpu", 1) == torch.device("cpu") and two_gpus == [1, 0]


def test_more_processes_than_gpus_is_one_error_naming_the_count(two_gpus):
    with pytest.raises(UserError, match="process 2 on this node has no GPU of its own: 2 visible") as info:
        select_device("auto", 2)
    assert "--nproc-per-node" in str(info.value) and two_gpus == []


def test_train_device_cuda_without_cuda_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="train.device=cuda but CUDA is not usable"):
        select_device("cuda", 0)
    assert select_device("auto", 0) == torch.device("cpu")


def test_gpu_ranks_join_gloo_for_cpu_tensors_and_nccl_for_cuda_tensors(monkeypatch, two_gpus, process_group):
    torchrun_env(monkeypatch, rank=3, local_rank=1, world_size=4)
    dist = setup_distributed("auto")
    assert dist == DistInfo(rank=3, local_rank=1, world_size=4, device=torch.device("cuda", 1))
    # device_id binds the communicator to this rank's GPU at once (no lazy init guessing cuda:0).
    assert process_group["init"] == [(("cpu:gloo,cuda:nccl",), {"timeout": distributed.TIMEOUT,
                                                                 "device_id": torch.device("cuda", 1)})]
    assert process_group["check"] == [dist] and two_gpus == [1]


def test_cpu_ranks_use_gloo_with_the_same_timeout(monkeypatch, two_gpus, process_group):
    torchrun_env(monkeypatch, rank=1, local_rank=0, world_size=2)
    dist = setup_distributed("cpu")
    assert dist.device == torch.device("cpu") and two_gpus == []
    assert process_group["init"] == [(("gloo",), {"timeout": distributed.TIMEOUT})]


def test_a_single_gpu_process_needs_no_process_group(monkeypatch, two_gpus, process_group):
    torchrun_env(monkeypatch, rank=0, local_rank=0, world_size=1)
    assert setup_distributed("auto").device == torch.device("cuda", 0)
    assert process_group == {"init": [], "check": []}


def gathered(monkeypatch, cuda_ranks: list[int]) -> None:
    """all_gather of the device types (gloo, CPU tensors) answers: these ranks train on CUDA, the rest on CPU."""
    def all_gather(out, mine):
        for rank, tensor in enumerate(out):
            tensor.fill_(1 if rank in cuda_ranks else 0)
    monkeypatch.setattr(distributed.torch_dist, "all_gather", all_gather)


def test_a_rank_without_gpu_among_gpu_ranks_is_named(monkeypatch):
    gathered(monkeypatch, [0, 2])
    with pytest.raises(UserError, match=r"ranks \[1\] found no usable GPU while ranks \[0, 2\] train on CUDA"):
        distributed.check_same_device_type(DistInfo(0, 0, 3, torch.device("cuda", 0)))
    gathered(monkeypatch, [0, 1, 2])
    distributed.check_same_device_type(DistInfo(0, 0, 3, torch.device("cuda", 0)))
    gathered(monkeypatch, [])
    distributed.check_same_device_type(DistInfo(0, 0, 3, torch.device("cpu")))


@pytest.fixture
def broadcasts(monkeypatch):
    """new_group / broadcast_object_list / destroy_process_group recorded; rank 0's value is 'from rank 0'."""
    calls = {"new_group": [], "broadcast": [], "destroy": []}

    def new_group(**kwargs):
        calls["new_group"].append(kwargs)
        return "waiting group"

    def broadcast_object_list(holder, *, src, group, device):
        calls["broadcast"].append({"src": src, "group": group, "device": device})
        holder[0] = "from rank 0"
    monkeypatch.setattr(distributed.torch_dist, "new_group", new_group)
    monkeypatch.setattr(distributed.torch_dist, "broadcast_object_list", broadcast_object_list)
    monkeypatch.setattr(distributed.torch_dist, "destroy_process_group", calls["destroy"].append)
    return calls


def test_a_long_wait_for_rank_0_runs_in_a_gloo_group_of_its_own(broadcasts):
    """On NCCL runs too: the object travels as a CPU tensor, and the long timeout is the new group's only."""
    wait = datetime.timedelta(hours=4)
    dist = DistInfo(1, 1, 2, torch.device("cuda", 1))
    assert broadcast_object("mine", dist, timeout=wait) == "from rank 0"
    assert broadcasts["new_group"] == [{"backend": "gloo", "timeout": wait}]
    assert broadcasts["broadcast"] == [{"src": 0, "group": "waiting group", "device": torch.device("cpu")}]
    assert broadcasts["destroy"] == ["waiting group"]


def test_a_broadcast_without_timeout_uses_the_default_group(broadcasts):
    assert broadcast_object("mine", DistInfo(1, 1, 2, torch.device("cuda", 1))) == "from rank 0"
    assert broadcasts["new_group"] == [] and broadcasts["destroy"] == []
    assert broadcasts["broadcast"] == [{"src": 0, "group": None, "device": torch.device("cpu")}]


@pytest.mark.cuda
def test_select_device_on_a_gpu():
    assert select_device("auto", 0) == torch.device("cuda", 0)
    assert torch.cuda.current_device() == 0
