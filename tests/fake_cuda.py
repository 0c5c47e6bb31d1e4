"""CUDA tensors without a GPU, for the tests of the CUDA-only branches: `fake_cuda(monkeypatch)`.

torch's FakeTensorMode (`torch._subclasses.fake_tensor`) makes tensors that carry a device, dtype, shape and
strides but no data. On a CUDA build of torch, `torch.randn(..., device="cuda")` and `module.to("cuda")`
inside the mode need no GPU and create no CUDA context, and the tensors carry CUDA's dispatch keys, so CUDA
autocast applies its real op policy to them (convs in the low precision, softmax/sum in fp32 unless a
dtype is given). Two of torch's availability checks have to be patched for that: `torch.autocast("cuda")`
and `GradScaler("cuda")` disable themselves when `torch.cuda.amp.common.amp_definitely_not_available()`,
and bf16 autocast raises unless `torch.cuda.is_bf16_supported()`.

What the mode cannot emulate (checked on torch 2.14.1+cu130, no GPU):
- backward: the autograd engine (`GraphTask::stash_current_streams`, C++) asks the CUDA hooks whether
  device 0 has a primary context, which raises "hasPrimaryContext expects a valid device index" when no
  device exists. Tests check the backward graph instead (`reached_parameters`); real gradients are computed
  by the `cuda`-marked tests on a GPU.
- the layout of bf16 convolutions: choosing the convolution backend for bf16 asks the device whether cuDNN
  supports bf16 (its compute capability); without a device torch picks its slow native kernel
  (`_ConvBackend.Slow2d`), whose output is NCHW-contiguous. fp32 and fp16 pick cuDNN, as on a GPU, and keep
  channels_last; bf16's layout is checked on a GPU only.
- values: anything that reads one (`.item()`, the GradScaler's inf check in `step`) raises.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode


@contextlib.contextmanager
def fake_cuda(monkeypatch):
    """Inside: CUDA tensors without data; real tensors used in an op become fake ones."""
    if not torch.backends.cuda.is_built():
        pytest.skip("a CPU-only build of torch: no CUDA device type to emulate")
    monkeypatch.setattr(torch.cuda.amp.common, "amp_definitely_not_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        yield mode


def reached_parameters(loss: torch.Tensor) -> set[int]:
    """ids of the leaf tensors whose gradient `loss.backward()` would accumulate: the AccumulateGrad nodes
    reachable from the loss's graph (what the engine would run, walked without running it)."""
    seen, stack, reached = set(), [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):  # AccumulateGrad
            reached.add(id(node.variable))
        stack.extend(child for child, _ in node.next_functions)
    return reached


def record_outputs(model: nn.Module, types: tuple[type, ...]) -> list[tuple[str, torch.Tensor]]:
    """(name, output) of every module of these types in the next forward passes."""
    outputs = []
    for name, module in model.named_modules():
        if isinstance(module, types):
            module.register_forward_hook(lambda _m, _i, out, name=name: outputs.append((name, out)))
    return outputs
