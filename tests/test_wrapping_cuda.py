"""wrapping.py's CUDA branches: SyncBatchNorm on multi-GPU runs, DDP bound to this rank's GPU, the model
placed on the GPU in the run's memory format. DDP is replaced by a recorder (its construction needs a process
group) and the GPU by fake CUDA tensors (tests/fake_cuda.py); the module tree is checked, never run."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from resnest_train.cluster.distributed import DistInfo
from resnest_train.models import create_model
from resnest_train.run import wrapping
from resnest_train.run.wrapping import place, unwrap, wrap_for_training
from tests.fake_cuda import fake_cuda


class RecordedDDP(nn.Module):
    """What `wrap_for_training` hands DistributedDataParallel."""

    def __init__(self, module: nn.Module, **kwargs):
        super().__init__()
        self.module = module
        self.kwargs = kwargs


@pytest.fixture
def ddp(monkeypatch):
    monkeypatch.setattr(wrapping, "DistributedDataParallel", RecordedDDP)


def batch_norms(model: nn.Module) -> dict[str, type]:
    return {name: type(m) for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def test_sync_bn_on_gpu_ranks_converts_every_batch_norm(ddp):
    model = create_model("resnest14", num_classes=10)
    norms, params = batch_norms(model), dict(model.named_parameters())
    wrapped = wrap_for_training(model, DistInfo(3, 1, 4, torch.device("cuda", 1)), sync_bn=True, compile_model=False)
    assert isinstance(wrapped, RecordedDDP) and unwrap(wrapped) is wrapped.module
    assert wrapped.kwargs == {"device_ids": [1], "gradient_as_bucket_view": True, "broadcast_buffers": False,
                              "static_graph": True}
    converted = batch_norms(wrapped.module)
    assert converted.keys() == norms.keys() and set(converted.values()) == {nn.SyncBatchNorm}
    # The same parameters (and so the same optimizer groups and checkpoint keys), only the layers replaced.
    assert all(p is params[name] for name, p in wrapped.module.named_parameters())


@pytest.mark.parametrize("accumulation,compile_model,static", [(1, False, True), (4, False, False),
                                                               (1, True, False)])
def test_ddp_graph_is_static_without_accumulation_or_compile(ddp, monkeypatch, accumulation, compile_model, static):
    """DDP's reducer asserts under `no_sync` with a static graph (torch 2.14), and torch.compile buckets
    the graph itself; buffers are never broadcast per forward (rank 0's are sent before evaluation)."""
    monkeypatch.setattr(torch, "compile", lambda model: model)
    wrapped = wrap_for_training(create_model("resnest14", num_classes=10), DistInfo(0, 0, 2, torch.device("cpu")),
                                sync_bn=False, compile_model=compile_model, accumulation=accumulation)
    assert wrapped.kwargs["static_graph"] is static and wrapped.kwargs["broadcast_buffers"] is False


def test_sync_bn_on_cpu_ranks_is_a_warning_and_ddp_gets_no_device(ddp, caplog):
    model = create_model("resnest14", num_classes=10)
    norms = batch_norms(model)
    with caplog.at_level(logging.WARNING, logger="resnest_train"):
        wrapped = wrap_for_training(model, DistInfo(1, 0, 2, torch.device("cpu")), sync_bn=True, compile_model=False)
    assert "model.sync_bn=true has no effect on CPU" in caplog.text
    assert batch_norms(wrapped.module) == norms and wrapped.kwargs["device_ids"] is None


def test_one_gpu_needs_neither_sync_bn_nor_ddp(ddp):
    model = create_model("resnest14", num_classes=10)
    norms = batch_norms(model)
    wrapped = wrap_for_training(model, DistInfo(0, 0, 1, torch.device("cuda", 0)), sync_bn=True, compile_model=False)
    assert wrapped is model and batch_norms(wrapped) == norms


@pytest.mark.parametrize("channels_last", [False, True])
def test_place_moves_parameters_and_buffers_to_the_gpu_in_the_memory_format(monkeypatch, channels_last):
    model = create_model("resnest14", num_classes=10, dropblock_prob=0.1)
    expected = torch.channels_last if channels_last else torch.contiguous_format
    with fake_cuda(monkeypatch):
        placed = place(model, DistInfo(0, 1, 2, torch.device("cuda", 1)), channels_last=channels_last)
        tensors = [*placed.parameters(), *placed.buffers()]
        assert {t.device for t in tensors} == {torch.device("cuda", 1)}
        weights = [p for p in placed.parameters() if p.dim() == 4]
        assert weights and all(w.is_contiguous(memory_format=expected) for w in weights)
        # Only the 1x1 convolutions' weights are contiguous in both formats.
        assert any(not w.is_contiguous() for w in weights) == channels_last
