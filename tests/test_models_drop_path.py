"""Stochastic depth as timm's ResNet has it: the per-block rates, the mask of timm's `drop_path` for the same
generator state, its place before the residual addition, identity in eval mode and nothing at rate 0; the
masks of a micro-batch follow from (seed, step, micro-batch) as DropBlock's do."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import drop_path as timm_drop_path

from resnest_train.models import ResNeStBottleneck, create_model
from resnest_train.models.drop_path import DropPath, drop_path_rates
from resnest_train.recipe.randomness import seed_micro_batch


def block_rates(model: torch.nn.Module) -> list[float]:
    """Each block's drop path rate, in network order (0 where it has none)."""
    blocks = [block for stage in (model.layer1, model.layer2, model.layer3, model.layer4) for block in stage]
    rates = []
    for block in blocks:
        module = block.drop_path
        rates.append(0.0 if module is None else getattr(module, "rate", getattr(module, "drop_prob", None)))
    return rates


@pytest.mark.parametrize("ours, theirs", [("resnest50", "resnest50d"), ("resnest101", "resnest101e"),
                                          ("skresnext50_32x4d", "skresnext50_32x4d")])
def test_rates_per_block_are_timms(ours, theirs):
    model = create_model(ours, num_classes=10, drop_path_rate=0.05)
    reference = timm.create_model(theirs, pretrained=False, num_classes=10, drop_path_rate=0.05)
    assert block_rates(model) == block_rates(reference)
    rates = block_rates(model)
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.05) and rates == sorted(rates)
    assert rates == drop_path_rates(0.05, len(rates))  # rate x i / (n - 1)


def test_mask_is_timms_for_the_same_generator_state():
    x = torch.randn(64, 8, 3, 3)
    torch.manual_seed(1)
    actual = DropPath(0.3).train()(x)
    torch.manual_seed(1)
    expected = timm_drop_path(x, 0.3, training=True)
    assert torch.equal(actual, expected)
    dropped = (actual == 0).flatten(1).all(1)
    assert 0 < dropped.sum() < 64  # whole samples dropped, the others scaled by 1 / keep
    torch.testing.assert_close(actual[~dropped], x[~dropped] / 0.7)


def test_eval_mode_is_the_identity():
    x = torch.randn(4, 8, 3, 3)
    assert DropPath(0.5).eval()(x) is x
    torch.manual_seed(0)
    plain = create_model("resnest14", num_classes=3, zero_init_last_bn=False).eval()
    torch.manual_seed(0)
    dropping = create_model("resnest14", num_classes=3, zero_init_last_bn=False, drop_path_rate=0.5).eval()
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(plain(images), dropping(images))


def test_rate_zero_adds_no_module_and_no_draw():
    """The default: the same modules, state dict and initialisation as a model built without the option, and
    a training forward pass that draws nothing more (the masks after it are the same)."""
    torch.manual_seed(0)
    plain = create_model("resnest14", num_classes=3, dropblock_prob=0.1)
    torch.manual_seed(0)
    zero = create_model("resnest14", num_classes=3, dropblock_prob=0.1, drop_path_rate=0.0)
    assert not any(isinstance(m, DropPath) for m in zero.modules())
    assert str(plain) == str(zero)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), zero.state_dict().values()))
    images = torch.randn(4, 3, 32, 32)
    outputs = []
    for model in (plain, zero):
        torch.manual_seed(5)
        outputs.append(model.train()(images))
        outputs.append(torch.rand(3))  # the generator is where it would be without the option
    assert all(torch.equal(a, b) for a, b in zip(outputs[:2], outputs[2:]))


def test_applied_to_the_residual_branch_before_the_addition():
    torch.manual_seed(0)
    block = ResNeStBottleneck(256, 64, drop_path_rate=0.5).train()
    torch.nn.init.ones_(block.bn3.weight)  # a branch that is not zero at the start
    x = torch.randn(16, 256, 8, 8)
    torch.manual_seed(3)
    out = block(x)
    torch.manual_seed(3)
    keep = torch.empty(16, 1, 1, 1).bernoulli_(0.5)  # the block's one draw, as DropPath makes it
    dropped = keep.flatten() == 0
    assert 0 < dropped.sum() < 16
    # a dropped sample is the shortcut alone, through the final ReLU
    assert torch.equal(out[dropped], torch.relu(x[dropped]))
    assert not torch.equal(out[~dropped], torch.relu(x[~dropped]))


def test_masks_follow_the_micro_batch_key():
    """The trainer seeds torch's generator per micro-batch (randomness.seed_micro_batch): the same key gives
    the same masks on any process that runs the micro-batch; another micro-batch, other masks."""
    # zero_init_last_bn off: zero branches would make any mask invisible
    model = create_model("resnest14", num_classes=3, drop_path_rate=0.5, zero_init_last_bn=False).train()
    images = torch.randn(8, 3, 32, 32)

    def forward(step: int, micro_batch: int) -> torch.Tensor:
        seed_micro_batch(0, step, micro_batch)
        return model(images)

    assert torch.equal(forward(4, 2), forward(4, 2))
    assert not torch.equal(forward(4, 2), forward(4, 3))
    assert not torch.equal(forward(4, 2), forward(5, 2))


@pytest.mark.parametrize("rate", [-0.1, 1.0])
def test_rates_outside_zero_one_are_refused(rate):
    with pytest.raises(ValueError, match="drop_path_rate must be in"):
        create_model("resnest14", num_classes=3, drop_path_rate=rate)
