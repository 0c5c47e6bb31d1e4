"""The model zoo: every published configuration by name, and the registry behind `create_model`.

ResNeSt-14..269 follow the paper's table (arXiv 2004.08955) and the official zoo; the ablation models use
the paper's `[radix]s[cardinality]x[width]d` notation, `fast` marking avd before the 3x3 conv
("ResNeSt-fast"). `resnet50d`, `seresnet50` and `skresnext50_32x4d` are the baselines the paper compares
and generalises, built on the same trunk so one recipe trains them all.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from torch import nn

from resnest_train.models.resnest import ResNeSt, ResNeStBottleneck
from resnest_train.models.selective_kernel import SelectiveKernelBottleneck

# name -> keyword arguments of ResNeSt (block included)
_RESNEST_D = dict(block=ResNeStBottleneck, deep_stem=True, avg_down=True, radix=2, cardinality=1,
                  bottleneck_width=64, avd=True, avd_first=False)

MODEL_SPECS: dict[str, dict[str, Any]] = {
    "resnest14": dict(_RESNEST_D, layers=(1, 1, 1, 1), stem_width=32),
    "resnest26": dict(_RESNEST_D, layers=(2, 2, 2, 2), stem_width=32),
    "resnest50": dict(_RESNEST_D, layers=(3, 4, 6, 3), stem_width=32),
    "resnest101": dict(_RESNEST_D, layers=(3, 4, 23, 3), stem_width=64),
    "resnest200": dict(_RESNEST_D, layers=(3, 24, 36, 3), stem_width=64),
    "resnest269": dict(_RESNEST_D, layers=(3, 30, 48, 8), stem_width=64),
    "resnet50d": dict(_RESNEST_D, layers=(3, 4, 6, 3), stem_width=32, radix=0, avd=False),
    "seresnet50": dict(_RESNEST_D, layers=(3, 4, 6, 3), stem_width=64, deep_stem=False, avg_down=False,
                       radix=0, avd=False, squeeze_excite=True),
    "skresnext50_32x4d": dict(block=SelectiveKernelBottleneck, layers=(3, 4, 6, 3), stem_width=64,
                              cardinality=32, bottleneck_width=4),
}

# The paper's ablations (table 2 / the official "fast" zoo): radix, cardinality, bottleneck width.
for _radix, _cardinality, _width in [(1, 1, 64), (2, 1, 64), (4, 1, 64), (1, 2, 40), (2, 2, 40), (4, 2, 40),
                                     (1, 4, 24)]:
    _suffix = f"{_radix}s{_cardinality}x{_width}d"
    for _fast in (False, True):
        MODEL_SPECS[f"resnest50_{'fast_' if _fast else ''}{_suffix}"] = dict(
            _RESNEST_D, layers=(3, 4, 6, 3), stem_width=32, radix=_radix, cardinality=_cardinality,
            bottleneck_width=_width, avd_first=_fast)

# Our name -> timm's name, for the models whose architecture timm has too (used by tests and benchmarks).
TIMM_NAMES = {
    "resnest14": "resnest14d", "resnest26": "resnest26d", "resnest50": "resnest50d",
    "resnest101": "resnest101e", "resnest200": "resnest200e", "resnest269": "resnest269e",
    "resnest50_fast_4s2x40d": "resnest50d_4s2x40d", "resnest50_fast_1s4x24d": "resnest50d_1s4x24d",
    "resnet50d": "resnet50d", "seresnet50": "seresnet50", "skresnext50_32x4d": "skresnext50_32x4d",
}

# Evaluation resolution of the released weights (docs/RECIPE.md), for reports.
DEFAULT_RESOLUTION = {"resnest101": 256, "resnest200": 320, "resnest269": 416}


def list_models() -> list[str]:
    return sorted(MODEL_SPECS)


def create_model(name: str, num_classes: int = 1000, **overrides: Any) -> nn.Module:
    """Build a registered model. Overrides: `dropout`, `zero_init_last_bn`, `dropblock_prob`,
    `drop_path_rate` (stochastic depth, timm's name), `output_stride` (32, or 16 / 8 for a dilated trunk), or
    any trunk/block option (e.g. `radix`, `stem_width`, `norm_layer`)."""
    if name not in MODEL_SPECS:
        raise KeyError(f"unknown model '{name}'; available: {', '.join(list_models())}")
    # Checked here, where the argument can be named: otherwise num_classes 0 builds an empty classifier
    # without a word, and a DropBlock probability (the fraction of activations to drop) of 1 or more, or a
    # negative one (or such a drop path rate), trains a model with a meaningless mask.
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    for key in ("dropblock_prob", "drop_path_rate"):
        if not 0.0 <= overrides.get(key, 0.0) < 1.0:
            raise ValueError(f"{key} must be in [0, 1), got {overrides[key]}")
    kwargs = dict(MODEL_SPECS[name], num_classes=num_classes, **overrides)
    block: Callable[..., nn.Module] = kwargs.pop("block")
    block_keys = {"radix", "cardinality", "bottleneck_width", "avd", "avd_first", "squeeze_excite"}
    block_kwargs = {key: kwargs.pop(key) for key in list(kwargs) if key in block_keys}
    return ResNeSt(partial(block, **block_kwargs), **kwargs)
