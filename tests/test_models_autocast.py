"""Split attention under CUDA autocast's policy, emulated on CPU: activations stay in the compute dtype.

CUDA autocast runs `sum` and `softmax` (and friends) in fp32 unless a dtype is given, and convs in the low
precision (PyTorch's AMP op reference). CPU autocast keeps those reductions in bf16, so the test runs a bf16
module under a TorchFunctionMode that applies the CUDA policy and records every op's output."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from resnest_train.models import RadixSoftmax, SplitAttentionConv2d
from resnest_train.models.selective_kernel import SelectiveKernelConv2d
from tests.test_models import _randomise

# Ops that CUDA autocast runs in fp32 when no dtype is given (autocast's `fp32_set_opt_dtype` policy).
_FP32_UNLESS_DTYPE = {torch.sum, torch.Tensor.sum, torch.mean, torch.Tensor.mean, torch.softmax,
                      torch.Tensor.softmax, F.softmax}
_LOW_PRECISION = {torch.conv2d, F.conv2d}


class CudaAutocastPolicy(TorchFunctionMode):
    """bf16 for convs, fp32 for the reductions above unless the call names a dtype; records outputs."""

    def __init__(self):
        super().__init__()
        self.outputs: list[tuple[str, tuple[int, ...], torch.dtype]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _LOW_PRECISION:
            args = tuple(a.to(torch.bfloat16) if isinstance(a, torch.Tensor) else a for a in args)
        out = func(*args, **kwargs)
        if func in _FP32_UNLESS_DTYPE and kwargs.get("dtype") is None and isinstance(out, torch.Tensor):
            out = out.float()
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.outputs.append((getattr(func, "__name__", str(func)), tuple(tensor.shape), tensor.dtype))
        return out


def _run(module, x):
    with torch.no_grad(), CudaAutocastPolicy() as policy:
        out = module(x)
    return out, policy.outputs


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("radix, cardinality", [(1, 1), (2, 1), (4, 1), (2, 2)])
def test_split_attention_keeps_bf16_activations(radix, cardinality, channels_last):
    module = SplitAttentionConv2d(32, 32, radix=radix, cardinality=cardinality).eval()
    _randomise(module)
    module = module.to(torch.bfloat16)
    x = torch.randn(2, 32, 8, 8, dtype=torch.bfloat16)
    if channels_last:
        module, x = module.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    out, outputs = _run(module, x)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 32, 8, 8)
    full_size = 2 * 32 * 8 * 8  # (B, C, H, W); the split tensor (B, radix*C, H, W) is larger still
    big_fp32 = [o for o in outputs if o[2] == torch.float32 and torch.Size(o[1]).numel() >= full_size]
    assert big_fp32 == []
    # Same values as the module in fp32, within bf16's precision.
    reference = SplitAttentionConv2d(32, 32, radix=radix, cardinality=cardinality).eval()
    reference.load_state_dict({k: v.float() for k, v in module.state_dict().items()})
    with torch.no_grad():
        torch.testing.assert_close(out.float(), reference(x.float()), rtol=0.05, atol=0.05)


def test_radix_softmax_returns_the_input_dtype():
    logits = torch.randn(2, 2 * 2 * 16, 1, 1, dtype=torch.bfloat16)
    out, _ = _run(RadixSoftmax(2, 2), logits)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), RadixSoftmax(2, 2)(logits.float()), rtol=0.01, atol=0.01)


def test_selective_kernel_keeps_bf16_activations():
    module = SelectiveKernelConv2d(64, groups=32).eval().to(torch.bfloat16)
    out, outputs = _run(module, torch.randn(2, 64, 8, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert [o for o in outputs if o[2] == torch.float32 and torch.Size(o[1]).numel() >= 2 * 64 * 64] == []
