"""The trunk: the released recipe's initialisation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from resnest_train.models import create_model


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
