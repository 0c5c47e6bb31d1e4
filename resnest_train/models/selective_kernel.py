"""SK-Net's Selective Kernel bottleneck (arXiv 1903.06586), the system ResNeSt generalises.

SKNet-50 is SK-ResNeXt-50 32x4d: two branches (3x3 and 3x3 dilated 2, standing in for 5x5), M=2, G=32,
r=16, L=32. Module names follow timm's `SelectiveKernelBottleneck` (`conv2.paths.0.conv`,
`conv2.attn.fc_reduce`, ...) so its weights load as they are.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from resnest_train.models.drop_path import make_drop_path
from resnest_train.models.dropblock import make_drop_block


class ConvBnAct(nn.Sequential):
    """conv -> BN (-> ReLU); a Sequential so the state-dict keys are `conv.*` and `bn.*`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, *, stride: int = 1,
                 dilation: int = 1, groups: int = 1, act: bool = True,
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d):
        padding = dilation * (kernel_size - 1) // 2
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation,
                              groups=groups, bias=False)
        self.bn = norm_layer(out_channels)
        self.act = nn.ReLU(inplace=True) if act else nn.Identity()


class SelectiveKernelConv2d(nn.Module):
    """Branches of 3x3 convs with growing dilation, fused by a softmax over branches per channel."""

    def __init__(self, channels: int, *, stride: int = 1, dilation: int = 1, groups: int = 32,
                 num_paths: int = 2, reduction: int = 16, min_attn_channels: int = 32,
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d):
        super().__init__()
        self.num_paths = num_paths
        self.channels = channels
        self.paths = nn.ModuleList(
            ConvBnAct(channels, channels, 3, stride=stride, dilation=dilation * (index + 1),
                      groups=min(groups, channels), norm_layer=norm_layer)
            for index in range(num_paths))
        # d = max(C / r, L), rounded to a multiple of L as timm does.
        attn_channels = max(min_attn_channels,
                            int(channels / reduction + min_attn_channels / 2) // min_attn_channels * min_attn_channels)
        self.attn = nn.Module()
        self.attn.fc_reduce = nn.Conv2d(channels, attn_channels, 1, bias=False)
        self.attn.bn = norm_layer(attn_channels)
        self.attn.act = nn.ReLU(inplace=True)
        self.attn.fc_select = nn.Conv2d(attn_channels, channels * num_paths, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        paths = [path(x) for path in self.paths]  # num_paths x (B, C, H, W)
        dtype = paths[0].dtype
        # Explicit dtypes: CUDA autocast would otherwise make the mean and softmax fp32 and the weighted sum
        # full-size fp32 (split_attention.py).
        gap = sum(path.mean((2, 3), keepdim=True, dtype=dtype) for path in paths)  # (B, C, 1, 1)
        attn = self.attn.fc_select(self.attn.act(self.attn.bn(self.attn.fc_reduce(gap))))
        # (B, M*C, 1, 1) -> (B, M, C, 1, 1): softmax across the M branches of each channel
        attn = F.softmax(attn.reshape(x.shape[0], self.num_paths, self.channels, 1, 1), dim=1, dtype=dtype)
        out = paths[0] * attn[:, 0]
        for index in range(1, self.num_paths):
            out = torch.addcmul(out, paths[index], attn[:, index])
        return out


class SelectiveKernelBottleneck(nn.Module):
    """1x1 -> selective-kernel 3x3 -> 1x1 (the ResNeXt bottleneck with SK in the middle)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, *, stride: int = 1, downsample: nn.Module | None = None,
                 cardinality: int = 32, bottleneck_width: int = 4, dilation: int = 1, is_first: bool = False,
                 dropblock_prob: float = 0.0, drop_path_rate: float = 0.0,
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d):
        super().__init__()
        del is_first  # the trunk's flag for avd, which SK-Net does not have
        width = int(planes * (bottleneck_width / 64.0)) * cardinality
        self.conv1 = ConvBnAct(inplanes, width, 1, norm_layer=norm_layer)
        self.conv2 = SelectiveKernelConv2d(width, stride=stride, dilation=dilation, groups=cardinality,
                                           norm_layer=norm_layer)
        self.conv3 = ConvBnAct(width, planes * self.expansion, 1, act=False, norm_layer=norm_layer)
        # DropBlock at the ResNeSt bottleneck's three positions (after the ReLU is the same as before it).
        self.drop1 = make_drop_block(dropblock_prob)
        self.drop2 = make_drop_block(dropblock_prob)
        self.drop3 = make_drop_block(dropblock_prob)
        self.drop_path = make_drop_path(drop_path_rate)  # the residual branch, before the addition (timm)
        self.act = nn.ReLU(inplace=True)
        self.downsample = downsample

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.conv3.bn.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.drop2(self.conv2(self.drop1(self.conv1(x))))
        out = self.drop3(self.conv3(out))
        if self.drop_path is not None:
            out = self.drop_path(out)
        return self.act(out + shortcut)
