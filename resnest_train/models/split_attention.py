"""Split-Attention convolution (ResNeSt, arXiv 2004.08955, section 3) in the radix-major layout.

The layout follows the official implementation and timm (`layers/split_attn.py`), so their weights load
unchanged: one grouped conv with `groups = cardinality * radix` whose output channels are radix-major
(split r occupies channels [r*C, (r+1)*C)); the attention MLP (fc1, fc2) is grouped by cardinality, so
its output is cardinality-major and `RadixSoftmax` turns it back into radix-major weights.

Unlike timm, the forward never calls `.contiguous()`, and under channels_last the splits are channel slices
combined with element-wise ops, which keep the memory format. That is what keeps channels_last fast (timm's
version is much slower in training with it); NCHW uses the broadcast 5-d form, faster there (BENCHMARKS.md).

Mixed precision: CUDA autocast runs `sum` and `softmax` in fp32 unless a dtype is given (PyTorch's AMP op
reference; its `fp32_set_opt_dtype` policy keeps an explicit dtype). An fp32 attention weight would then
promote the weighted sum, and the block's output, to full-size fp32 tensors. So every reduction here names
the input's dtype (the kernels still accumulate in fp32) and the small attention tensor is cast to it before
it meets the full-size splits. DropBlock is not applied in here: the bottleneck applies it to this module's
output, where the Gluon code of the released weights has it (`resnest/gluon/resnet.py`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import _symbolic_trace

# torch.fx's symbolic tracer (not torch.export's, which reads the layout as a constant); older torch has
# only the function that answers for both.
_fx_tracing = getattr(_symbolic_trace, "is_fx_symbolic_tracing", _symbolic_trace.is_fx_tracing)


class RadixSoftmax(nn.Module):
    """Softmax across the radix splits of each cardinal group; a sigmoid gate when radix == 1."""

    def __init__(self, radix: int, cardinality: int):
        super().__init__()
        self.radix = radix
        self.cardinality = cardinality

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.radix == 1:
            return torch.sigmoid(x)
        batch = x.shape[0]
        # (B, cardinality*radix*C', 1, 1) -> (B, cardinality, radix, C'): cardinality-major from fc2
        x = x.reshape(batch, self.cardinality, self.radix, -1)
        x = F.softmax(x, dim=2, dtype=x.dtype)  # explicit dtype: no fp32 output under CUDA autocast
        # (B, cardinality, radix, C') -> (B, radix, cardinality, C') -> (B, radix*cardinality*C', 1, 1)
        return x.transpose(1, 2).reshape(batch, -1, 1, 1)


class SplitAttentionConv2d(nn.Module):
    """conv (groups = cardinality * radix) -> BN -> ReLU -> split attention -> (B, out_channels, H, W)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 1,
        dilation: int = 1,
        cardinality: int = 1,
        radix: int = 2,
        reduction_factor: int = 4,
        min_inter_channels: int = 32,
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
        act_layer: Callable[..., nn.Module] = nn.ReLU,
    ):
        super().__init__()
        self.radix = radix
        self.out_channels = out_channels
        # The reference's width of the attention MLP: max(in * radix / 4, 32).
        inter_channels = max(in_channels * radix // reduction_factor, min_inter_channels)
        self.conv = nn.Conv2d(in_channels, out_channels * radix, kernel_size, stride, padding, dilation,
                              groups=cardinality * radix, bias=False)
        self.bn0 = norm_layer(out_channels * radix)
        self.act0 = act_layer(inplace=True)
        self.fc1 = nn.Conv2d(out_channels, inter_channels, 1, groups=cardinality)
        self.bn1 = norm_layer(inter_channels)
        self.act1 = act_layer(inplace=True)
        self.fc2 = nn.Conv2d(inter_channels, out_channels * radix, 1, groups=cardinality)
        self.radix_softmax = RadixSoftmax(radix, cardinality)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act0(self.bn0(self.conv(x)))  # (B, radix*C, H, W)
        # The layout picks the faster form. torch.fx cannot branch on a tensor's property while it traces
        # (create_feature_extractor, symbolic_trace): the traced graph takes the 5-d form, which is
        # correct for either layout (a view that splits the channel dim exists for both).
        if self.radix > 1 and (_fx_tracing() or x.is_contiguous()):
            return self._combine_nchw(x)
        gap = self._splits_gap(x.sum((2, 3), keepdim=True, dtype=x.dtype), x.shape[2] * x.shape[3])
        attn = self._attention(gap).to(x.dtype)  # (B, radix*C, 1, 1): small, cast before the full-size ops
        if self.radix == 1:
            return x * attn
        # channels_last: channel slices are views that keep the layout (the 5-d form is slower here,
        # and timm's trailing .contiguous() turns every block's output back into NCHW).
        splits = x.split(self.out_channels, dim=1)
        weights = attn.split(self.out_channels, dim=1)
        out = splits[0] * weights[0]
        for split, weight in zip(splits[1:], weights[1:]):
            out = torch.addcmul(out, split, weight)
        return out

    def _combine_nchw(self, x: torch.Tensor) -> torch.Tensor:
        """NCHW: a 5-d view (B, radix, C, H, W) feeds both the pooling and one broadcast multiply + sum over
        the splits. Both uses on the same view let autograd add the pooling's broadcast gradient in place
        into the multiply's; the multiply's backward writes x's gradient in one kernel, where slices need a
        `cat` (`benchmark.py attention`)."""
        batch, _, height, width = x.shape
        x = x.view(batch, self.radix, self.out_channels, height, width)
        gap = self._splits_gap(x.sum((3, 4), dtype=x.dtype).view(batch, -1, 1, 1), height * width)
        attn = self._attention(gap).to(x.dtype)  # (B, radix*C, 1, 1), radix-major
        # (B, radix, C, H, W) * (B, radix, C, 1, 1) -> sum over radix -> (B, C, H, W), in x's dtype
        return (x * attn.view(batch, self.radix, self.out_channels, 1, 1)).sum(1, dtype=x.dtype)

    def _splits_gap(self, sums: torch.Tensor, pixels: int) -> torch.Tensor:
        """(B, radix*C, 1, 1) spatial sums -> (B, C, 1, 1) GAP of the splits' sum. Pooling first (the GAP of
        the sum equals the sum of the GAPs) keeps the radix sum on the small tensor; sums rather than a mean,
        whose backward materialises a full-size division (BENCHMARKS.md, "model step profile")."""
        if self.radix > 1:
            sums = sums.reshape(sums.shape[0], self.radix, self.out_channels, 1, 1).sum(1, dtype=sums.dtype)
        return sums * (1.0 / pixels)

    def _attention(self, gap: torch.Tensor) -> torch.Tensor:
        return self.radix_softmax(self.fc2(self.act1(self.bn1(self.fc1(gap)))))
