"""The ResNeSt trunk and bottleneck (arXiv 2004.08955) and the ResNet-D / SE-Net trunks it generalises.

One trunk class serves every model of the zoo: the block type and its options (radix, cardinality,
bottleneck width, avd, SE) are passed in; the stem (deep 3x3 or 7x7) and the shortcut (ResNet-D average
pool, or strided 1x1 conv) are trunk options. Module names follow timm's `ResNet` so state dicts are
interchangeable (`conv1.0.weight`, `layer1.0.conv2.fc1.weight`, `fc.weight`, ...); the structure follows
the official PyTorch port and torchvision's `resnet.py`; DropBlock positions and the initialisation follow
the Gluon code that trained the released weights (`resnest/gluon/resnet.py`, `scripts/gluon/train.py`);
stochastic depth (drop path) follows timm's ResNet (drop_path.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from resnest_train.models.drop_path import drop_path_rates, make_drop_path
from resnest_train.models.dropblock import DropBlock2d, make_drop_block
from resnest_train.models.split_attention import SplitAttentionConv2d

NormLayer = Callable[[int], nn.Module]


class SqueezeExcite(nn.Module):
    """SE-Net channel gate (arXiv 1709.01507): GAP -> 1x1 (C/16) -> ReLU -> 1x1 (C) -> sigmoid."""

    def __init__(self, channels: int, *, reduction: int = 16, divisor: int = 8):
        super().__init__()
        # timm's rounding of the reduced width (a multiple of 8), so its seresnet50 weights fit.
        reduced = max(divisor, int(channels / reduction + divisor / 2) // divisor * divisor)
        self.fc1 = nn.Conv2d(channels, reduced, 1)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(gate)


class ResNeStBottleneck(nn.Module):
    """1x1 -> split-attention 3x3 (or plain 3x3 when radix == 0) -> 1x1, with avd and optional SE.

    DropBlock sits where the Gluon code has it: after bn1, after the whole split-attention output (after
    bn2 for radix 0) and after bn3, each with its own mask. Before or after the ReLU is the same thing, as
    the mask and its scale are non-negative. Drop path (`drop_path_rate`, this block's rate) drops the whole
    residual branch per sample, after SE and before the addition, where timm's Bottleneck has it."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        *,
        stride: int = 1,
        downsample: nn.Module | None = None,
        radix: int = 2,
        cardinality: int = 1,
        bottleneck_width: int = 64,
        avd: bool = True,
        avd_first: bool = False,
        dilation: int = 1,
        is_first: bool = False,
        squeeze_excite: bool = False,
        dropblock_prob: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ):
        super().__init__()
        group_width = int(planes * (bottleneck_width / 64.0)) * cardinality
        # avd: the stride moves from the 3x3 conv to a 3x3 average pool (before or after it). As in the
        # official port, the first block of stages 2-4 (`is_first`) has the pool even at stride 1, which
        # only happens in a dilated stage; count_include_pad stays torch's default (True), as there.
        has_avd = avd and (stride > 1 or is_first)
        conv_stride = 1 if has_avd else stride
        self.conv1 = nn.Conv2d(inplanes, group_width, 1, bias=False)
        self.bn1 = norm_layer(group_width)
        self.drop1 = make_drop_block(dropblock_prob)
        self.act1 = nn.ReLU(inplace=True)
        self.avd_first = nn.AvgPool2d(3, stride, padding=1) if has_avd and avd_first else None
        self.conv2, self.bn2, self.act2 = _middle_conv(group_width, conv_stride, dilation, cardinality, radix,
                                                       norm_layer)
        self.drop2 = make_drop_block(dropblock_prob)
        self.avd_last = nn.AvgPool2d(3, stride, padding=1) if has_avd and not avd_first else None
        self.conv3 = nn.Conv2d(group_width, planes * self.expansion, 1, bias=False)
        self.bn3 = norm_layer(planes * self.expansion)
        self.drop3 = make_drop_block(dropblock_prob)
        self.se = SqueezeExcite(planes * self.expansion) if squeeze_excite else None
        self.drop_path = make_drop_path(drop_path_rate)
        self.act3 = nn.ReLU(inplace=True)
        self.downsample = downsample

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.act1(self.drop1(self.bn1(self.conv1(x))))
        if self.avd_first is not None:
            out = self.avd_first(out)
        out = self.act2(self.drop2(self.bn2(self.conv2(out))))
        if self.avd_last is not None:
            out = self.avd_last(out)
        out = self.drop3(self.bn3(self.conv3(out)))
        if self.se is not None:
            out = self.se(out)
        if self.drop_path is not None:
            out = self.drop_path(out)
        # In place: the BN/SE output is not needed by their backward, and a fresh block-sized tensor per
        # block costs an allocation and its page faults on CPU (BENCHMARKS.md).
        out += shortcut
        return self.act3(out)


def make_stem(stem_width: int, deep_stem: bool, norm_layer: NormLayer) -> tuple[nn.Module, int]:
    """Deep stem: three 3x3 convs (ResNet-C/D, arXiv 1812.01187); otherwise the 7x7 conv. Returns the
    module (named `conv1`, followed by the trunk's `bn1`) and its output width."""
    if not deep_stem:
        return nn.Conv2d(3, stem_width, 7, stride=2, padding=3, bias=False), stem_width
    stem = nn.Sequential(
        nn.Conv2d(3, stem_width, 3, stride=2, padding=1, bias=False),
        norm_layer(stem_width),
        nn.ReLU(inplace=True),
        nn.Conv2d(stem_width, stem_width, 3, stride=1, padding=1, bias=False),
        norm_layer(stem_width),
        nn.ReLU(inplace=True),
        nn.Conv2d(stem_width, stem_width * 2, 3, stride=1, padding=1, bias=False),
    )
    return stem, stem_width * 2


def make_downsample(inplanes: int, outplanes: int, stride: int, avg_down: bool,
                    norm_layer: NormLayer) -> nn.Module:
    """Shortcut projection. ResNet-D (`avg_down`): stride x stride average pool then a 1x1 conv, so no
    activation is skipped by a strided 1x1 (arXiv 1812.01187, fig. 2c). A dilated stage has stride 1 and
    no pool: the official port's 1x1 pool there is the identity (a 2x2 one, stride 1, would give H-1)."""
    if not avg_down:
        return nn.Sequential(nn.Conv2d(inplanes, outplanes, 1, stride=stride, bias=False), norm_layer(outplanes))
    if stride == 1:
        pool: nn.Module = nn.Identity()
    else:
        pool = nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False)
    return nn.Sequential(pool, nn.Conv2d(inplanes, outplanes, 1, bias=False), norm_layer(outplanes))


# (stride, dilation) of the four stages per output stride: the official port's `dilated=True` (8) and
# `dilation=2` (16) (`resnest/torch/models/resnet.py`): later stages keep their resolution and dilate
# instead (DeepLab, arXiv 1706.05587).
STAGE_PLANS = {
    32: ((1, 1), (2, 1), (2, 1), (2, 1)),
    16: ((1, 1), (2, 1), (2, 1), (1, 2)),
    8: ((1, 1), (2, 1), (1, 2), (1, 4)),
}


class ResNeSt(nn.Module):
    """stem -> maxpool -> four stages of bottlenecks -> global average pool -> dropout -> fc.

    `drop_path_rate`: stochastic depth of the last block, block i of n getting rate x i / (n - 1) (timm's rule).

    `output_stride` 16 or 8 dilates stage 4 (and stage 3) instead of striding, for dense prediction."""

    def __init__(
        self,
        block: Callable[..., nn.Module],
        layers: Sequence[int],
        *,
        num_classes: int = 1000,
        stem_width: int = 64,
        deep_stem: bool = False,
        avg_down: bool = False,
        output_stride: int = 32,
        dropout: float = 0.0,
        dropblock_prob: float = 0.0,
        drop_path_rate: float = 0.0,
        zero_init_last_bn: bool = True,
        norm_layer: NormLayer = nn.BatchNorm2d,
        **block_kwargs,
    ):
        super().__init__()
        if output_stride not in STAGE_PLANS:
            raise ValueError(f"output_stride must be one of {sorted(STAGE_PLANS)}, got {output_stride}")
        self.conv1, inplanes = make_stem(stem_width, deep_stem, norm_layer)
        self.bn1 = norm_layer(inplanes)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        expansion = 4  # every block of the zoo is a bottleneck
        previous_dilation = 1
        block_rates = iter(drop_path_rates(drop_path_rate, sum(layers)))  # over the whole network, in order
        for index, (planes, num_blocks, (stride, dilation)) in enumerate(
                zip((64, 128, 256, 512), layers, STAGE_PLANS[output_stride])):
            downsample = make_downsample(inplanes, planes * expansion, stride, avg_down, norm_layer) \
                if stride != 1 or inplanes != planes * expansion else None
            stage = []
            for block_index in range(num_blocks):
                first = block_index == 0
                stage.append(block(
                    inplanes, planes, stride=stride if first else 1, downsample=downsample if first else None,
                    # The official port: a dilated stage's first block keeps the previous stage's dilation
                    # (1 in a dilation-2 stage, 2 in a dilation-4 one), with padding = dilation.
                    dilation=previous_dilation if first else dilation, is_first=first and index > 0,
                    # DropBlock in stages 3 and 4 only, as in the recipe of the released weights.
                    dropblock_prob=dropblock_prob if index >= 2 else 0.0, drop_path_rate=next(block_rates),
                    norm_layer=norm_layer, **block_kwargs))
                inplanes = planes * expansion
            previous_dilation = dilation
            self.add_module(f"layer{index + 1}", nn.Sequential(*stage))
        self.num_features = inplanes
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(inplanes, num_classes)
        self.init_weights(zero_init_last_bn)

    def init_weights(self, zero_init_last_bn: bool) -> None:
        """The released weights' initialiser, Gluon's `Xavier(rnd_type='gaussian', factor_type='in',
        magnitude=2)` (`scripts/gluon/train.py`): N(0, 2 / fan_in), i.e. He-normal on fan_in, on every conv
        and linear weight, the classifier included; biases 0; norm gamma 1, beta 0."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        # After every other init, so no later loop undoes it (the official port's bug). Each residual
        # block then starts as the identity: "Accurate, Large Minibatch SGD", arXiv 1706.02677, 5.1.
        if zero_init_last_bn:
            for module in self.modules():
                if hasattr(module, "zero_init_last"):
                    module.zero_init_last()

    def set_dropblock_prob(self, prob: float) -> None:
        """Set every DropBlock's probability in place (the trainer ramps it linearly from 0 over training);
        a tensor write, so a compiled model does not recompile for each new value."""
        for module in self.modules():
            if isinstance(module, DropBlock2d):
                module.set_prob(prob)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(x.mean((2, 3)))  # dropout right before the classifier, active in train mode only
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _middle_conv(width: int, stride: int, dilation: int, cardinality: int, radix: int,
                 norm_layer: NormLayer) -> tuple[nn.Module, nn.Module, nn.Module]:
    """The block's 3x3 stage: split attention (its own BN and ReLU inside) for radix >= 1, else a grouped
    conv with BN and ReLU (ResNeXt / ResNet-D)."""
    if radix >= 1:
        conv = SplitAttentionConv2d(width, width, kernel_size=3, stride=stride, padding=dilation, dilation=dilation,
                                    cardinality=cardinality, radix=radix, norm_layer=norm_layer)
        return conv, nn.Identity(), nn.Identity()
    conv = nn.Conv2d(width, width, 3, stride, padding=dilation, dilation=dilation, groups=cardinality, bias=False)
    return conv, norm_layer(width), nn.ReLU(inplace=True)
