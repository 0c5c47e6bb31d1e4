"""DropBlock as the Gluon code of the released weights does it: its mask formula, its effective drop rates,
its positions in the bottleneck, and a probability that torch.compile does not recompile for."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from resnest_train.models import create_model
from resnest_train.models.dropblock import DropBlock2d, drop_block_multiplier


def _gluon_reference(x: torch.Tensor, uniform: torch.Tensor, prob: float, block_size: int = 3) -> torch.Tensor:
    """Gluon's `DropBlock.hybrid_forward` written out pixel by pixel: seeds where uniform < gamma over the
    full map, each seed drops the block centred on it (max pool, padding 1), one rescale by numel / kept."""
    _, channels, height, width = uniform.shape
    gamma = prob * (height * width) / block_size**2 / ((width - block_size + 1) * (height - block_size + 1))
    seeds = uniform[0] < gamma
    keep = torch.ones(channels, height, width)
    reach = block_size // 2
    for c, i, j in seeds.nonzero().tolist():
        keep[c, max(i - reach, 0):i + reach + 1, max(j - reach, 0):j + reach + 1] = 0.0
    return x * keep * (keep.numel() / keep.sum())


@pytest.mark.parametrize("size", [28, 14, 7, 4])
def test_mask_matches_gluon_formula_for_the_same_draws(size):
    torch.manual_seed(0)
    module = DropBlock2d(0.3).train()
    x = torch.randn(2, 16, size, size)
    torch.manual_seed(1)
    actual = module(x)
    torch.manual_seed(1)
    uniform = torch.rand(1, 16, size, size)  # the module's one draw for the whole batch
    torch.testing.assert_close(actual, _gluon_reference(x, uniform, 0.3))


def _expected_rate(size: int, prob: float, block_size: int = 3) -> float:
    """Fraction dropped under Gluon's formula: a pixel survives when none of the seed positions whose block
    reaches it fired (fewer of them at the border)."""
    gamma = prob * size * size / block_size**2 / (size - block_size + 1) ** 2
    reach = torch.tensor([min(i, 1) + 1 + min(size - 1 - i, 1) for i in range(size)], dtype=torch.float64)
    return (1 - (1 - gamma) ** (reach[:, None] * reach[None, :])).mean().item()


@pytest.mark.parametrize("size, rate", [(28, 0.105), (14, 0.115), (7, 0.151)])
def test_effective_drop_rate(size, rate):
    torch.manual_seed(0)
    module = DropBlock2d(0.1).train()
    x = torch.ones(1, 512, size, size)
    dropped = torch.stack([(module(x) == 0).float().mean() for _ in range(20)]).mean().item()
    assert abs(_expected_rate(size, 0.1) - rate) < 0.003
    assert abs(dropped - rate) < 0.006  # torchvision's drop_block2d: ~0.097 at every size


def test_one_mask_for_the_batch_and_one_scale():
    module = DropBlock2d(0.2).train()
    out = module(torch.ones(4, 32, 14, 14))
    assert all(torch.equal(out[0], sample) for sample in out[1:])
    kept = out[0][out[0] > 0]
    assert kept.unique().numel() == 1  # one scalar, numel / kept, for every channel
    torch.testing.assert_close(kept[0], torch.tensor(out[0].numel() / kept.numel()))


def test_identity_in_eval_and_at_zero():
    x = torch.randn(2, 8, 7, 7)
    module = DropBlock2d(0.5)
    assert module.eval()(x) is x
    module.train().set_prob(0.0)
    assert torch.equal(module(x), x)


@pytest.mark.parametrize("size", [1, 2, 3])
def test_maps_smaller_than_the_block(size):
    multiplier = drop_block_multiplier(torch.rand(1, 64, size, size), 0.5, 3)
    assert multiplier.shape == (1, 64, size, size) and torch.isfinite(multiplier).all()
    model = create_model("resnest14", num_classes=3, dropblock_prob=0.5).train()
    assert model(torch.randn(2, 3, 32, 32)).isfinite().all()  # stage 4 at 1x1


def test_positions_after_bn1_split_attention_and_bn3():
    model = create_model("resnest14", num_classes=3, dropblock_prob=0.1)
    block = model.layer3[0]
    assert all(isinstance(getattr(block, f"drop{i}"), DropBlock2d) for i in (1, 2, 3))
    # Not inside the split attention (after bn0), where the PyTorch port and timm put it.
    assert not any(isinstance(m, DropBlock2d) for m in block.conv2.modules())
    assert not any(isinstance(m, DropBlock2d) for m in (*model.layer1.modules(), *model.layer2.modules()))
    seen = []
    block.drop2.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    block.conv2.register_forward_hook(lambda module, args, out: seen.append(out))
    model.train()(torch.randn(2, 3, 64, 64))
    assert seen[0] is seen[1]  # drop2 takes the attention-weighted sum itself
    assert "drop_prob" not in str(list(model.state_dict()))  # state-dict keys stay timm's


def test_probability_is_a_buffer_set_in_place():
    model = create_model("resnest14", num_classes=3, dropblock_prob=0.1)
    buffers = [m.drop_prob for m in model.modules() if isinstance(m, DropBlock2d)]
    model.set_dropblock_prob(0.05)
    assert all(b.dim() == 0 and b.item() == pytest.approx(0.05) for b in buffers)
    assert buffers[0] is next(m.drop_prob for m in model.modules() if isinstance(m, DropBlock2d))


def test_compiled_model_does_not_recompile_when_the_probability_ramps():
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    model = create_model("resnest14", num_classes=3, dropblock_prob=0.1).train()
    compiled = torch.compile(model, backend=counting_backend)
    images = torch.randn(2, 3, 32, 32)
    compiled(images)
    first = len(graphs)
    for prob in (0.01, 0.02, 0.05, 0.08):
        model.set_dropblock_prob(prob)
        out = compiled(images)
    assert len(graphs) == first  # a float attribute recompiled once per value
    model.set_dropblock_prob(0.0)
    torch.manual_seed(0)
    eager = model(images)
    torch.manual_seed(0)
    torch.testing.assert_close(compiled(images), eager)
    assert out.shape == (2, 3)
    torch._dynamo.reset()


def test_bf16_activations_stay_bf16():
    module = DropBlock2d(0.1).train()
    assert module(torch.randn(2, 8, 7, 7, dtype=torch.bfloat16)).dtype == torch.bfloat16
    x = torch.randn(2, 8, 7, 7).to(memory_format=torch.channels_last)
    assert F.relu(module(x)).is_contiguous(memory_format=torch.channels_last)
