"""The trunk: the released recipe's initialisation, and output stride 8 / 16 as the official PyTorch port's
dilated ResNeSt (`resnest/torch/models/resnet.py`, `dilated=True` / `dilation=2`)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from resnest_train.models import create_model
from tests.test_models import _randomise


def test_init_is_gluon_xavier_in_magnitude_2():
    torch.manual_seed(0)
    model = create_model("resnest14")
    weights = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for module in weights:
        fan_in = module.weight[0].numel()
        if module.weight.numel() >= 16384:  # enough samples for a 3% tolerance on the std
            assert module.weight.std().item() == pytest.approx(math.sqrt(2 / fan_in), rel=0.03), module
        if module.bias is not None:
            assert torch.count_nonzero(module.bias) == 0, module
    # The classifier too (torch's default would be uniform with std 1 / sqrt(3 * fan_in)).
    assert model.fc.weight.std().item() == pytest.approx(math.sqrt(2 / 2048), rel=0.03)
    # fan_in, not timm's fan_out: layer4.0.conv3 maps 512 -> 2048 channels.
    assert model.layer4[0].conv3.weight.std().item() == pytest.approx(math.sqrt(2 / 512), rel=0.03)
    for name, module in model.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            gamma = 0.0 if name.endswith("bn3") else 1.0  # zero-init of the last BN, applied last
            assert torch.all(module.weight == gamma) and torch.all(module.bias == 0), name


# --- the official port's dilated trunk, written out for the comparison --------------------------------------

OFFICIAL_STAGES = {8: ((1, 1), (2, 1), (1, 2), (1, 4)), 16: ((1, 1), (2, 1), (2, 1), (1, 2)),
                   32: ((1, 1), (2, 1), (2, 1), (2, 1))}


def _official_split_attention(sa, x, dilation):
    radix = sa.radix
    u = F.relu(sa.bn0(F.conv2d(x, sa.conv.weight, None, 1, dilation, dilation, sa.conv.groups)))
    splits = u.chunk(radix, 1)
    attn = sa.radix_softmax(sa.fc2(F.relu(sa.bn1(sa.fc1(sum(splits).mean((2, 3), keepdim=True))))))
    return sum(a * s for a, s in zip(attn.chunk(radix, 1), splits))


def _official_block(block, x, *, stride, dilation, is_first, stage_dilation):
    """`Bottleneck.forward` of the port: avd = avd and (stride > 1 or is_first), a 3x3 average pool after
    the split attention; the avg_down shortcut pools (stride x stride) only in undilated stages."""
    out = F.relu(block.bn1(block.conv1(x)))
    out = _official_split_attention(block.conv2, out, dilation)
    if stride > 1 or is_first:
        out = F.avg_pool2d(out, 3, stride, padding=1)
    out = block.bn3(block.conv3(out))
    shortcut = x
    if block.downsample is not None:
        _, conv, bn = block.downsample
        if stage_dilation == 1 and stride > 1:
            x = F.avg_pool2d(x, stride, stride, ceil_mode=True, count_include_pad=False)
        shortcut = bn(conv(x))
    return F.relu(out + shortcut)


def _official_forward(model, x, output_stride):
    x = model.maxpool(model.act1(model.bn1(model.conv1(x))))
    for index, (stride, dilation) in enumerate(OFFICIAL_STAGES[output_stride]):
        for block_index, block in enumerate(getattr(model, f"layer{index + 1}")):
            first = block_index == 0
            # `_make_layer`: the first block gets dilation 1 in a dilation-1/2 stage and 2 in a dilation-4
            # one; is_first is True for stages 2-4.
            x = _official_block(block, x, stride=stride if first else 1,
                                dilation=(1 if dilation in (1, 2) else 2) if first else dilation,
                                is_first=first and index > 0, stage_dilation=dilation)
    return model.fc(x.mean((2, 3)))


@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_dilated_trunk_matches_the_official_port(output_stride):
    model = create_model("resnest26", num_classes=10, output_stride=output_stride).eval()
    _randomise(model)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, actual = _official_forward(model, images, output_stride), model(images)
    assert (actual - expected).abs().max() / expected.abs().max() < 1e-5


@pytest.mark.parametrize("output_stride, size", [(8, 28), (16, 14), (32, 7)])
def test_output_stride_feature_size(output_stride, size):
    with torch.device("meta"):
        model = create_model("resnest50", output_stride=output_stride).eval()
        features = model.forward_features(torch.empty(1, 3, 224, 224))
    assert features.shape == (1, 2048, size, size)


def test_dilated_model_keeps_the_state_dict_keys():
    plain, dilated = create_model("resnest14"), create_model("resnest14", output_stride=8)
    assert {k: v.shape for k, v in plain.state_dict().items()} == \
        {k: v.shape for k, v in dilated.state_dict().items()}
    with pytest.raises(ValueError, match="output_stride"):
        create_model("resnest14", output_stride=4)
