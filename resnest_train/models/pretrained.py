"""Loading weights people already have: our checkpoints, official ResNeSt `.pth` files, timm state dicts.

All three use the same key names for the ResNeSt and ResNet-D models (timm's), so loading is: unwrap the
container (`{'model': ...}`, `{'state_dict': ...}`), strip wrapper prefixes (`module.` from DDP,
`_orig_mod.` from torch.compile), then a strict comparison of keys and shapes that reports every mismatch.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

_PREFIXES = ("module.", "_orig_mod.")


class WeightsMismatchError(ValueError):
    """The weights do not fit the model; the message lists missing/unexpected keys and shape mismatches."""


def _unwrap(obj: object) -> Mapping[str, torch.Tensor]:
    for key in ("model", "state_dict", "model_state"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            return _unwrap(obj[key])
    if not isinstance(obj, Mapping):
        raise WeightsMismatchError(f"expected a state dict, found {type(obj).__name__}")
    return obj


def clean_state_dict(obj: object) -> dict[str, torch.Tensor]:
    state = {}
    for key, value in _unwrap(obj).items():
        for prefix in _PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        state[key] = value
    return state


def _summary(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def check_fit(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(v.shape)]
    problems = []
    if missing:
        problems.append(f"missing keys: {_summary(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_summary(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch (checkpoint vs model): {_summary(shapes, 3)}")
    if problems:
        raise WeightsMismatchError("; ".join(problems))


def load_pretrained(model: nn.Module, path: str | Path) -> nn.Module:
    """Load weights from `path` into `model` (in place); raise WeightsMismatchError naming what does not
    fit, FileNotFoundError if there is no such file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means an unreadable file
        raise WeightsMismatchError(f"cannot read weights from {path}: {exc}") from None
    state = clean_state_dict(obj)
    check_fit(model, state)
    model.load_state_dict(state, strict=True)
    return model
