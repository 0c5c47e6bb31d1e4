"""Models that trace: every model of the zoo goes through `torch.fx.symbolic_trace` and torchvision's
`create_feature_extractor` (how detection and segmentation code wraps a backbone) with the eager model's
outputs; timm's `features_only` on our weights gives the same features; `torch.export` keeps working.

Split attention picks its faster form from the activation's layout, a branch torch.fx cannot take while it
traces: the traced graph takes the 5-d form, the one eager NCHW runs, so NCHW outputs are identical (the
same ops in the same order: compared exactly); channels_last inputs go through the other form's ops in
another order, so they agree up to float32 rounding."""

from __future__ import annotations

import pytest
import timm
import torch
from torchvision.models.feature_extraction import create_feature_extractor

from resnest_train.models import create_model, list_models
from resnest_train.models.zoo import TIMM_NAMES

LARGE = {"resnest101", "resnest200", "resnest269"}  # seconds each to build and run: in the slow set


def images(layout=torch.contiguous_format) -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)).contiguous(memory_format=layout)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in LARGE else n for n in list_models()])
def test_every_model_traces_with_the_eager_outputs(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).eval()
    x = images()
    eager = {}
    model.layer2.register_forward_hook(lambda _module, _inputs, output: eager.update(mid=output))
    with torch.no_grad():
        traced = torch.fx.symbolic_trace(model)
        features = create_feature_extractor(model, {"layer2": "mid", "layer4": "out"})(x)
        assert torch.equal(traced(x), model(x))  # measured max abs difference: 0.0
        assert torch.equal(features["out"], model.forward_features(x))
        assert torch.equal(features["mid"], eager["mid"])


def test_a_traced_model_takes_channels_last_inputs():
    torch.manual_seed(0)
    model = create_model("resnest50", num_classes=10).eval().to(memory_format=torch.channels_last)
    x = images(torch.channels_last)
    with torch.no_grad():
        expected = model(x)
        got = create_feature_extractor(model, {"fc": "logits"})(x)["logits"]
    # the 5-d form sums the radix splits in another order than eager channels_last's slices: float32 rounding
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in LARGE else n for n in TIMM_NAMES])
def test_timm_features_only_on_our_weights_gives_our_features(name):
    torch.manual_seed(0)
    ours = create_model(name, num_classes=10).eval()
    theirs = timm.create_model(TIMM_NAMES[name], features_only=True, out_indices=(1, 2, 3, 4)).eval()
    theirs.load_state_dict({k: v for k, v in ours.state_dict().items() if not k.startswith("fc.")})
    x = images()
    with torch.no_grad():
        expected = create_feature_extractor(ours, {f"layer{i}": str(i) for i in range(1, 5)})(x)
        for i, feature in enumerate(theirs(x), start=1):
            # timm's split attention computes the same sums in another order
            assert (feature - expected[str(i)]).abs().max() <= 1e-5 * expected[str(i)].abs().max(), i


@pytest.mark.slow
def test_torch_export_keeps_working():
    torch.manual_seed(0)
    model = create_model("resnest14", num_classes=10).eval()
    x = images()
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        assert torch.allclose(exported.module()(x), model(x), rtol=1e-5, atol=1e-6)  # another op decomposition
