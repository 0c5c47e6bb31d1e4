"""A ResNeSt training forward on CUDA under autocast, as the trainer places and runs it: the activations and
logits in the compute dtype (split attention too), every parameter in the backward graph, channels_last from
the stem to the last block. Without a GPU on fake CUDA tensors (tests/fake_cuda.py says what they cannot
show: real gradients, bf16 convolution layouts); with one, the same checks on real tensors (`cuda`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from resnest_train.cluster.distributed import DistInfo
from resnest_train.models import SplitAttentionConv2d, create_model
from resnest_train.recipe.engine import resolve_precision
from resnest_train.run.wrapping import place
from tests.fake_cuda import fake_cuda, reached_parameters, record_outputs

GPU = DistInfo(0, 0, 1, torch.device("cuda", 0))
BATCH = 4
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": torch.float32}
_LAYERS = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.AvgPool2d)


class BatchActivations(TorchFunctionMode):
    """Records the dtype of every op output shaped like a batch of feature maps (B, C, H, W)."""

    def __init__(self):
        super().__init__()
        self.dtypes: list[tuple[str, torch.dtype]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[0] == BATCH:
            self.dtypes.append((getattr(func, "__name__", str(func)), out.dtype))
        return out


def resnest14() -> nn.Module:
    """Built on the CPU, as the trainer builds it (a model built inside the fake mode cannot be moved)."""
    model = create_model("resnest14", num_classes=10, dropblock_prob=0.1).train()
    model.set_dropblock_prob(0.1)  # the end of the ramp: DropBlock draws its masks
    return model


def training_forward(model: nn.Module, amp: str, *, channels_last: bool = True):
    """The model placed on the GPU as the trainer does, one forward and loss under the run's precision;
    returns (model, loss, logits, layer outputs, split-attention outputs, batch-activation dtypes)."""
    model = place(model, GPU, channels_last=channels_last)
    layers = record_outputs(model, _LAYERS)
    attention = record_outputs(model, (SplitAttentionConv2d,))
    images = torch.randn(BATCH, 3, 64, 64, device="cuda")
    images = images.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    targets = torch.randint(0, 10, (BATCH,), device="cuda")
    with resolve_precision(amp, GPU.device).autocast(), BatchActivations() as activations:
        logits = model(images)
        loss = F.cross_entropy(logits, targets)
    return model, loss, logits, layers + attention, attention, activations.dtypes


def check_dtypes(amp: str, model, loss, logits, attention, activations) -> None:
    dtype = _DTYPES[amp]
    assert logits.device.type == "cuda" and logits.shape == (BATCH, 10) and logits.dtype == dtype
    assert loss.dtype == torch.float32  # autocast computes the loss in fp32: what GradScaler scales
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights
    blocks = [m for m in model.modules() if isinstance(m, SplitAttentionConv2d)]
    assert len(attention) == len(blocks) > 0 and {out.dtype for _, out in attention} == {dtype}
    # No op makes a full-size fp32 copy of a batch of activations (softmax and sum run in fp32 under
    # CUDA autocast unless given a dtype: FACTS.md).
    assert [op for op, got in activations if got != dtype] == []


def not_channels_last(layers) -> list[str]:
    return [name for name, out in layers if not out.is_contiguous(memory_format=torch.channels_last)]


# Both layouts: split attention combines NCHW batches through a 5-d view and channels_last ones through
# channel slices (under bf16 here the convolutions hand it NCHW either way: fake_cuda.py).
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("amp", ["bf16", "fp16", "none"])
def test_training_forward_on_fake_cuda_keeps_the_compute_dtype(monkeypatch, amp, channels_last):
    model = resnest14()
    with fake_cuda(monkeypatch):
        model, loss, logits, _, attention, activations = training_forward(model, amp, channels_last=channels_last)
        check_dtypes(amp, model, loss, logits, attention, activations)
        # The backward graph cannot run here (tests/fake_cuda.py): every parameter must be in it.
        assert reached_parameters(loss) == {id(p) for p in model.parameters()}


@pytest.mark.parametrize("amp", ["fp16", "none"])  # bf16: cuDNN's choice needs the device (fake_cuda.py)
def test_channels_last_from_stem_to_last_block_on_fake_cuda(monkeypatch, amp):
    model = resnest14()
    with fake_cuda(monkeypatch):
        model, _, _, layers, _, _ = training_forward(model, amp)
        assert all(p.is_contiguous(memory_format=torch.channels_last) for p in model.parameters() if p.dim() == 4)
        assert layers and not_channels_last(layers) == []


def test_contiguous_model_stays_contiguous_on_fake_cuda(monkeypatch):
    """The control for the test above: the layout check sees the difference."""
    model = resnest14()
    with fake_cuda(monkeypatch):
        layers = training_forward(model, "fp16", channels_last=False)[3]
        # (B, C, 1, 1) tensors are contiguous in both formats; every other output is flagged.
        assert not_channels_last(layers) == [name for name, out in layers if out.shape[-2:] != (1, 1)]


@pytest.mark.cuda
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_training_step_on_a_gpu(amp):
    torch.manual_seed(0)
    model, loss, logits, layers, attention, activations = training_forward(resnest14(), amp)
    check_dtypes(amp, model, loss, logits, attention, activations)
    assert not_channels_last(layers) == []
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
