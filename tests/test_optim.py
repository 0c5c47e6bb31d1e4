"""Optimizer parameter groups: no weight decay on any bias or normalization parameter."""

from __future__ import annotations

from resnest_train.models import create_model
from resnest_train.recipe.optim import param_groups


def test_param_groups_exempt_every_bias_and_norm_parameter():
    model = create_model("resnest50")
    decay, no_decay = param_groups(model, 1e-4)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    no_decay_ids = {id(p) for p in no_decay["params"]}
    names = {name for name, p in model.named_parameters() if id(p) in no_decay_ids}
    # the deep-stem and downsample BNs that the official port's `'bn' in name` filter missed
    assert {"conv1.1.weight", "conv1.4.bias", "layer2.0.downsample.2.weight", "fc.bias"} <= names
    for name, param in model.named_parameters():
        assert (id(param) in no_decay_ids) == (param.ndim <= 1 or name.endswith(".bias")), name
