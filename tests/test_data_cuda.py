"""The data backends' CUDA branches without a GPU: where DALI decodes (`mixed` = nvJPEG) and hands batches
over (`.gpu()` after a CPU graph), checked on the pipelines' Python-side graphs, which DALI builds with
`device_id=0` on a machine without CUDA (FACTS.md); DALI's HWC batches as the channels_last view the model
takes; the torchvision loader's pinned memory and its hand-over to the GPU (fake CUDA tensors:
tests/fake_cuda.py). Running a GPU pipeline needs a GPU and DALI: scripts/gpu_check.sh."""

from __future__ import annotations

import dataclasses
import tempfile

import pytest
import torch

from resnest_train.data.index import load_index
from resnest_train.data.plan import decoder_device
from resnest_train.data.torchvision import TorchLoader, _data_loader, build_torch_train
from resnest_train.errors import UserError
from tests.conftest import make_order, make_plan
from tests.fake_cuda import fake_cuda

CUDA = torch.device("cuda", 0)


def on_gpu(plan, decoder: str = "gpu"):
    """The plan of a rank training on cuda:0 (plans are built from a DistInfo; the tests' ones are CPU)."""
    return dataclasses.replace(plan, device=CUDA, decoder=decoder)


def test_dali_decodes_on_the_gpu_by_default_where_training_runs_there():
    assert decoder_device("auto", CUDA) == "gpu" and decoder_device("auto", torch.device("cpu")) == "cpu"
    assert decoder_device("cpu", CUDA) == "cpu"
    with pytest.raises(UserError, match="data.dali_device=gpu needs CUDA"):
        decoder_device("gpu", torch.device("cpu"))


# ---------------------------------------------------------------------------------------------- DALI graphs
@pytest.fixture
def dali(tmp_path, monkeypatch):
    """The DALI module, its conditionals' autograph files kept in tmp_path (FACTS.md)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    from resnest_train.data import dali
    return dali


def graph(dali, plan, *, train: bool):
    """(ops as (schema name, device), output devices) of the train or val pipeline's graph for `plan`. The
    graph is built by DALI's Python side only (`_build_graph`, DALI 2.4); `build()` would need CUDA."""
    if train:
        from resnest_train.data import dali_train
        from resnest_train.data.dali_feed import MicroBatchFeed
        from resnest_train.data.samples import SampleList
        samples = SampleList.from_pairs("folder", ["."], [(0, "a.jpg", 0)])
        pipe = dali_train.train_pipeline(plan, MicroBatchFeed(plan, samples), batch_size=2)
    else:
        pipe = dali.val_pipeline(plan, lambda: None, batch_size=2)
    pipe._build_graph()
    ops = [(getattr(op._op, "schema_name", None) or op._op.schema.Name(), op._op.device) for op in pipe._ops]
    return ops, [node.device for node in pipe._graph_out]


def decoders(ops) -> list[str]:
    return [device for name, device in ops if name.startswith("decoders__")]


@pytest.mark.dali
@pytest.mark.parametrize("train", [True, False], ids=["train", "val"])
def test_gpu_decoding_runs_nvjpeg_and_dalis_gpu_ops(dali, tmp_path, train):
    plan = on_gpu(make_plan(tmp_path))
    assert dali._device_id(plan) == 0 and isinstance(dali.graph_ops(plan), dali.DaliOps)
    ops, outputs = graph(dali, plan, train=train)
    assert decoders(ops) == ["mixed"]  # nvJPEG: CPU in, GPU out
    assert ("CropMirrorNormalize", "gpu") in ops and ("PythonFunction", "cpu") not in ops
    assert outputs == ["gpu", "gpu"]  # images and labels: the iterator hands torch CUDA tensors


@pytest.mark.dali
@pytest.mark.parametrize("train", [True, False], ids=["train", "val"])
def test_cpu_decoding_for_a_gpu_trainer_hands_the_batch_over_at_the_end(dali, tmp_path, train):
    plan = on_gpu(make_plan(tmp_path), decoder="cpu")
    assert dali._device_id(plan) == 0 and isinstance(dali.graph_ops(plan), dali.HostOps)
    ops, outputs = graph(dali, plan, train=train)
    assert decoders(ops) == ["cpu"] and {device for _, device in ops} == {"cpu"}
    assert outputs == ["gpu", "gpu"]  # `.gpu()`: the only transfer, after the last op


@pytest.mark.dali
def test_cpu_training_builds_a_pipeline_without_device(dali, tmp_path):
    plan = make_plan(tmp_path)
    assert dali._device_id(plan) is None  # no CUDA context at all
    ops, outputs = graph(dali, plan, train=True)
    assert decoders(ops) == ["cpu"] and outputs == ["cpu", "cpu"]


@pytest.mark.dali
def test_dali_hwc_batches_reach_the_model_as_a_channels_last_view(dali, tmp_path):
    """DALI writes channels_last batches as HWC; DaliLoader permutes them to (B, 3, H, W) without a copy."""
    images = torch.randn(4, 3, 8, 6)  # what the model is to receive, NCHW
    hwc = images.permute(0, 2, 3, 1).contiguous()  # the pipeline's HWC output
    loader = object.__new__(dali.DaliLoader)  # its iterator replaced: no pipeline to build
    loader.plan = make_plan(tmp_path, channels_last=True)
    loader.iterator = [[{"data": hwc, "label": torch.tensor([[1], [0], [3], [2]], dtype=torch.int32)}]]
    batch, targets = next(iter(loader))
    assert batch.shape == (4, 3, 8, 6) and batch.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(batch, images) and batch.data_ptr() == hwc.data_ptr()  # a view, not a copy
    assert targets.tolist() == [1, 0, 3, 2] and targets.dtype == torch.int64


# -------------------------------------------------------------------------------------------- torchvision
@pytest.mark.parametrize("device, pinned", [(CUDA, True), (torch.device("cpu"), False)])
def test_torchvision_pins_host_memory_when_training_on_the_gpu(tmp_path, device, pinned):
    plan = dataclasses.replace(make_plan(tmp_path), device=device)
    assert _data_loader([], plan, batch_size=2).pin_memory == pinned


@pytest.mark.parametrize("channels_last", [False, True])
def test_torchvision_batches_arrive_on_the_gpu_in_the_models_format(monkeypatch, tmp_path, channels_last):
    plan = on_gpu(make_plan(tmp_path, channels_last=channels_last))
    images = torch.randn(2, 3, 8, 8)  # collated NCHW on the host
    loader = TorchLoader([(images, torch.tensor([1, 2]), torch.tensor([5, 6]))], plan)
    with fake_cuda(monkeypatch):
        (batch, targets), = list(loader)
    assert batch.device == CUDA and batch.is_contiguous(memory_format=plan.memory_format)
    assert batch.is_contiguous() != channels_last
    assert targets.device == CUDA and targets.dtype == torch.int64 and loader.delivered == [5, 6]


@pytest.mark.cuda
def test_torchvision_training_batches_on_a_gpu(image_root):
    plan = on_gpu(make_plan(image_root, channels_last=True, workers=2), decoder="cpu")
    loader = build_torch_train(plan, load_index(image_root).train, make_order(48, 8))
    loader.set_epoch(0)
    images, targets = next(iter(loader))
    assert loader.loader.pin_memory and images.device == CUDA and targets.device == CUDA
    assert images.shape == (8, 3, 32, 32) and images.is_contiguous(memory_format=torch.channels_last)
