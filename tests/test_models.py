"""The model zoo: golden parameter counts, timm equivalence, split attention vs a naive loop, init."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from resnest_train.models import SplitAttentionConv2d, create_model, list_models, load_pretrained
from resnest_train.models.pretrained import WeightsMismatchError
from resnest_train.models.zoo import TIMM_NAMES

# Papers' counts in millions (docs/RECIPE.md), 1000 classes.
PARAMS = {"resnest14": 10.61, "resnest26": 17.07, "resnest50": 27.48, "resnest101": 48.28,
          "resnest200": 70.20, "resnest269": 110.93, "resnet50d": 25.58, "seresnet50": 28.09,
          "skresnext50_32x4d": 27.48}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_parameter_counts_match_the_papers(name):
    with torch.device("meta"):
        model = create_model(name)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == PARAMS[name]


def test_registry_lists_the_zoo():
    names = list_models()
    for name in ["resnest50", "resnest50_1s4x24d", "resnest50_2s2x40d", "resnest50_4s2x40d", "resnest50_1s1x64d",
                 "resnest50_2s1x64d", "resnest50_4s1x64d", "resnest50_fast_1s4x24d", "resnet50d"]:
        assert name in names


def _randomise(model: nn.Module) -> None:
    """Random weights and BN statistics, so that no zero-init or identity BN hides a difference."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.dtype.is_floating_point:
                if name.endswith("running_var"):
                    tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
                else:
                    offset = 1.0 if name.endswith("bn3.weight") else 0.0
                    tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.1 + offset)


@pytest.mark.parametrize("name", ["resnest14", "resnest50_fast_4s2x40d", "resnest50_fast_1s4x24d", "resnet50d",
                                  "seresnet50", "skresnext50_32x4d", "resnest101"])
def test_timm_weights_give_timm_output(name, tmp_path):
    reference = timm.create_model(TIMM_NAMES[name], num_classes=10).eval()
    _randomise(reference)
    path = tmp_path / "timm.pth"
    torch.save(reference.state_dict(), path)
    ours = create_model(name, num_classes=10).eval()
    assert load_pretrained(ours, path) == []
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, actual = reference(images), ours(images)
    assert (actual - expected).abs().max() / expected.abs().max() < 1e-5


def _naive_split_attention(module: SplitAttentionConv2d, x: torch.Tensor, radix: int, cardinality: int):
    """The paper's cardinality-major description (fig. 2), one cardinal group and one split at a time."""
    conv = module.conv
    channels = module.out_channels
    per_group = channels // cardinality  # channels of one split of one cardinal group
    in_per_conv_group = x.shape[1] // (radix * cardinality)
    inter_per_group = module.fc1.out_channels // cardinality
    outputs = []
    for k in range(cardinality):
        splits = []
        for r in range(radix):
            g = r * cardinality + k  # radix-major position of (split r, cardinal group k) in the conv
            out_slice = slice(g * per_group, (g + 1) * per_group)
            u = F.conv2d(x[:, g * in_per_conv_group:(g + 1) * in_per_conv_group], conv.weight[out_slice],
                         None, conv.stride, conv.padding, conv.dilation)
            bn = module.bn0
            u = F.batch_norm(u, bn.running_mean[out_slice], bn.running_var[out_slice], bn.weight[out_slice],
                             bn.bias[out_slice], False, 0.0, bn.eps)
            splits.append(F.relu(u))
        gap = sum(splits).mean((2, 3))  # (B, C/K)
        inter = slice(k * inter_per_group, (k + 1) * inter_per_group)
        z = gap @ module.fc1.weight[inter, :, 0, 0].T + module.fc1.bias[inter]
        bn = module.bn1
        z = F.relu(F.batch_norm(z, bn.running_mean[inter], bn.running_var[inter], bn.weight[inter],
                                bn.bias[inter], False, 0.0, bn.eps))
        rows = slice(k * radix * per_group, (k + 1) * radix * per_group)
        logits = (z @ module.fc2.weight[rows, :, 0, 0].T + module.fc2.bias[rows]).view(-1, radix, per_group)
        weights = torch.sigmoid(logits) if radix == 1 else logits.softmax(dim=1)
        outputs.append(sum(weights[:, r, :, None, None] * splits[r] for r in range(radix)))
    return torch.cat(outputs, dim=1)


@pytest.mark.parametrize("radix", [1, 2, 4])
@pytest.mark.parametrize("cardinality", [1, 2])
def test_split_attention_matches_naive_loop(radix, cardinality):
    torch.manual_seed(0)
    module = SplitAttentionConv2d(16, 16, radix=radix, cardinality=cardinality, stride=2).eval()
    _randomise(module)
    x = torch.randn(3, 16, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(module(x), _naive_split_attention(module, x, radix, cardinality),
                                   rtol=1e-5, atol=1e-5)
        cl = module(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(cl, module(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["resnest14", "skresnext50_32x4d", "seresnet50"])
def test_every_parameter_receives_a_gradient(name):
    model = create_model(name, num_classes=5, zero_init_last_bn=False)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def _last_bns(model):
    return [getattr(block, "bn3", None) or block.conv3.bn for stage in
            (model.layer1, model.layer2, model.layer3, model.layer4) for block in stage]


@pytest.mark.parametrize("name", ["resnest14", "skresnext50_32x4d"])
def test_zero_init_last_bn(name):
    assert all(bn.weight.abs().sum() == 0 for bn in _last_bns(create_model(name)))
    assert all(bn.weight.abs().sum() > 0 for bn in _last_bns(create_model(name, zero_init_last_bn=False)))


def test_dropout_acts_before_fc_in_train_mode_only():
    model = create_model("resnest14", num_classes=3, dropout=0.5)
    features = torch.ones(4, model.num_features)
    seen = []
    model.fc.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    model.train().forward_head(features[:, :, None, None])
    model.eval().forward_head(features[:, :, None, None])
    assert set(seen[0].unique().tolist()) == {0.0, 2.0}  # inverted dropout at p=0.5
    assert torch.equal(seen[1], features)


def test_dropblock_inactive_at_zero_and_in_eval():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    plain = create_model("resnest14", num_classes=3, zero_init_last_bn=False).eval()
    dropping = create_model("resnest14", num_classes=3, zero_init_last_bn=False, dropblock_prob=0.5)
    dropping.load_state_dict(plain.state_dict())
    with torch.no_grad():
        assert torch.equal(dropping.eval()(x), plain(x))
        dropping.train()
        plain.train()
        assert not torch.allclose(dropping(x), plain(x))
        dropping.set_dropblock_prob(0.0)
        assert torch.allclose(dropping(x), plain(x))


def test_load_pretrained_names_mismatches(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"model": create_model("resnet50d", num_classes=10).state_dict()}, path)
    with pytest.raises(WeightsMismatchError, match="missing keys: .*conv2.conv.weight.*unexpected keys: .*bn2"):
        load_pretrained(create_model("resnest50", num_classes=10), path)
    with pytest.raises(WeightsMismatchError, match="shape mismatch.*fc.weight"):
        load_pretrained(create_model("resnet50d", num_classes=7), path)


def test_state_dict_strips_wrappers(tmp_path):
    model = create_model("resnest14", num_classes=4)
    path = tmp_path / "ddp.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, path)
    torch.manual_seed(1)
    loaded = create_model("resnest14", num_classes=4)
    assert not torch.equal(loaded.conv1[0].weight, model.conv1[0].weight)  # another draw before loading
    assert load_pretrained(loaded, path) == []
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_channels_last_and_compile_split():
    model = create_model("resnest14", num_classes=4).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        features = model.forward_features(x)
        torch.testing.assert_close(model.forward_head(features), ref)
        cl = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-4)


def test_gmacs_of_the_report():
    from resnest_train.models.__main__ import report
    assert round(report("resnest50")[1], 2) == 5.37  # torch's flop counter; the paper says 5.39
    assert round(report("skresnext50_32x4d")[1], 2) == 4.46  # paper: 4.47


@pytest.mark.parametrize("kwargs,argument", [
    (dict(num_classes=0), "num_classes"), (dict(num_classes=-1), "num_classes"),
    (dict(dropblock_prob=1.0), "dropblock_prob"), (dict(dropblock_prob=-0.1), "dropblock_prob"),
    (dict(dropblock_prob=float("nan")), "dropblock_prob"),
])
def test_create_model_rejects_out_of_range_arguments(kwargs, argument):
    with torch.device("meta"), pytest.raises(ValueError, match=f"^{argument} "):
        create_model("resnest14", **kwargs)
    with torch.device("meta"):
        create_model("resnest14", num_classes=1, dropblock_prob=0.0)
        create_model("resnest14", dropblock_prob=0.99)
