"""engine.py's precision on a CUDA device: which `train.amp` values autocast there (bf16 only where the GPU
supports it), which need the GradScaler, and what autocast and the scaler then do to CUDA tensors (fake
ones without a GPU: tests/fake_cuda.py; a real fp16 step with the scaler on a GPU, marked `cuda`)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from resnest_train.recipe.engine import Precision, forward_backward, optimizer_step, resolve_precision
from tests.fake_cuda import fake_cuda

CUDA = torch.device("cuda", 0)


def test_fp16_autocasts_on_cuda_with_the_scaler():
    precision = resolve_precision("fp16", CUDA)
    assert precision == Precision(True, torch.float16, "cuda") and precision.needs_scaler


@pytest.mark.parametrize("supported", [True, False])
def test_bf16_on_cuda_follows_the_gpus_support(monkeypatch, caplog, supported):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: supported)
    with caplog.at_level(logging.INFO, logger="resnest_train"):
        precision = resolve_precision("bf16", CUDA)
    if supported:
        assert precision == Precision(True, torch.bfloat16, "cuda") and not precision.needs_scaler
        assert caplog.text == ""
    else:  # pre-Ampere GPUs: fp32, said once, rather than autocast's RuntimeError at the first step
        assert precision == Precision(False, torch.float32, "cuda") and not precision.needs_scaler
        assert "train.amp=bf16 is not supported on cuda: training in fp32" in caplog.text


def test_no_amp_on_cuda_is_fp32():
    assert resolve_precision("none", CUDA) == Precision(False, torch.float32, "cuda")


@pytest.mark.parametrize("amp, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16), ("none", torch.float32)])
def test_autocast_and_scaler_on_fake_cuda_tensors(monkeypatch, amp, dtype):
    """The runner's scaler is `GradScaler(device.type, enabled=precision.needs_scaler)`: on CUDA it scales
    the fp32 loss for fp16 only (scaling an fp16 loss by 2**16 would overflow)."""
    layer = nn.Linear(8, 4)
    with fake_cuda(monkeypatch):
        precision = resolve_precision(amp, CUDA)
        layer = layer.to(CUDA)
        with precision.autocast():
            logits = layer(torch.randn(2, 8, device=CUDA))
            loss = F.cross_entropy(logits, torch.tensor([0, 3], device=CUDA))
        assert logits.dtype == dtype and loss.dtype == torch.float32 and layer.weight.dtype == torch.float32
        scaler = torch.amp.GradScaler(CUDA.type, enabled=precision.needs_scaler)
        assert scaler.is_enabled() == (amp == "fp16")
        scaled = scaler.scale(loss)
        assert scaled.device == CUDA and scaled.dtype == torch.float32
        assert (scaled is loss) == (amp != "fp16")  # disabled: the loss itself, no multiply


@pytest.mark.cuda
def test_fp16_step_with_the_scaler_on_a_gpu():
    """One step as the trainer takes it (engine.forward_backward, engine.optimizer_step): the gradient unscaled
    before the update (equal to the fp32 one within fp16's precision), the update made with it, the scale
    kept after a finite step."""
    torch.manual_seed(0)
    layer = nn.Linear(8, 4).to(CUDA)
    reference = copy.deepcopy(layer)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    precision = resolve_precision("fp16", CUDA)
    scaler = torch.amp.GradScaler(CUDA.type, enabled=precision.needs_scaler)
    images, targets = torch.randn(16, 8, device=CUDA), torch.randint(0, 4, (16,), device=CUDA)
    before = copy.deepcopy(layer.weight.detach())
    forward_backward(layer, images, targets, criterion=nn.CrossEntropyLoss(), scaler=scaler, precision=precision)
    scale = scaler.get_scale()
    optimizer_step(optimizer, scaler)  # the trainer's step: scaler.step unscales the gradients in place first
    grad = layer.weight.grad.clone()
    F.cross_entropy(reference(images), targets).backward()
    torch.testing.assert_close(grad, reference.weight.grad, rtol=0.02, atol=1e-3)
    torch.testing.assert_close(layer.weight.detach(), before - 0.1 * grad)
    assert scale > 1 and scaler.get_scale() == scale
