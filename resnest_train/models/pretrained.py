"""Loading weights people already have: our checkpoints, official ResNeSt `.pth` files, timm state dicts and
timm training checkpoints (`.pth.tar`), as `.pth`/`.pt` or `.safetensors` (the format the weights hub serves).

All use the same key names for the ResNeSt and ResNet-D models (timm's), so loading is: read the file,
unwrap the container (`{'model': ...}`, `{'state_dict': ...}`), strip wrapper prefixes (`module.` from DDP,
`_orig_mod.` from torch.compile), then a strict comparison of keys and shapes that reports every mismatch.
Fine-tuning (`new_head=True`) keeps the model's fresh classifier when the file's has another shape. Every
failure is one line that says what is wrong with which file.
"""

from __future__ import annotations

import argparse
import codecs
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

_PREFIXES = ("module.", "_orig_mod.")
HEAD_KEYS = ("fc.weight", "fc.bias")
# BatchNorm fills in a missing counter itself (`_NormBase._load_from_state_dict`); exports often drop it.
_OPTIONAL_SUFFIX = "num_batches_tracked"


class WeightsMismatchError(ValueError):
    """The weights do not fit the model; the message lists missing/unexpected keys and shape mismatches."""


class WeightsFileError(WeightsMismatchError):
    """The file cannot be read as weights (a subclass, so callers catching WeightsMismatchError see it)."""


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


def check_fit(model: nn.Module, state: Mapping[str, torch.Tensor], *, skip: tuple[str, ...] = ()) -> None:
    """Raise WeightsMismatchError naming every key that does not fit; keys in `skip` may be missing."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and k not in skip and not k.endswith(_OPTIONAL_SUFFIX)]
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


def _unreadable(path: Path, exc: Exception) -> WeightsFileError:
    """One line for a file torch cannot load, saying why in words: torch's weights-only messages span many
    lines (with advice to turn the safety check off), and a text file gives the unpickler's bare `: 101`."""
    head = path.read_bytes()[:64]
    if b"\0" not in head:
        try:  # incremental: a character cut at byte 64 is not a decoding error
            text = codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
            return WeightsFileError(f"{path} is a text file, not saved weights (it starts with {text[:24]!r})")
        except UnicodeDecodeError:
            pass
    message = str(exc)
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", message)
    if refused:
        return WeightsFileError(f"{path} holds a Python object ({refused.group(1)}) that a weights-only load "
                                "refuses; save a plain state dict (torch.save(model.state_dict(), path))")
    if "Weights only load failed" in message:
        reason = re.search(r"(Unsupported [^\n]*)", message)
        detail = f" (the unpickler stopped at: {reason.group(1)})" if reason else ""
        return WeightsFileError(f"{path} is not a file written by torch.save or safetensors{detail}")
    lines = message.strip().splitlines()
    return WeightsFileError(f"cannot read weights from {path}: {lines[0] if lines else type(exc).__name__}")


def read_weights(path: str | Path) -> object:
    """The object saved at `path` (`.safetensors` or torch's format), loaded on CPU without running code."""
    path = Path(path)
    if path.is_dir():
        raise WeightsFileError(f"{path} is a directory, not a weights file")
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.stat().st_size == 0:
        raise WeightsFileError(f"{path} is empty (0 bytes)")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError) as exc:
            raise WeightsFileError(f"cannot read {path} as safetensors: {exc}") from None
    try:
        # timm's training checkpoints store their argparse options (`args`), a Namespace of plain values.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure here means a file we cannot read as weights
        raise _unreadable(path, exc) from None


def load_pretrained(model: nn.Module, path: str | Path, *, new_head: bool = False) -> list[str]:
    """Load weights from `path` into `model` (in place) and return the keys left as the model had them
    (`load_state` on what the file holds)."""
    return load_state(model, read_weights(path), new_head=new_head)


def load_state(model: nn.Module, obj: object, *, new_head: bool = False) -> list[str]:
    """Load a weights object (a state dict, or a file's object around one: ours, timm's, the official
    port's) into `model` (in place) and return the keys left as the model had them.

    `new_head=True` (fine-tuning): when the file's classifier (`fc.weight`, `fc.bias`) has another shape
    than the model's, the trunk loads strictly and the model keeps its fresh classifier; the returned list
    names the skipped keys. Anything else that does not fit raises WeightsMismatchError naming the keys;
    an unreadable file raises WeightsFileError (a WeightsMismatchError), a missing one FileNotFoundError."""
    state = clean_state_dict(obj)
    skipped: tuple[str, ...] = ()
    if new_head:
        expected = model.state_dict()
        if any(k in state and k in expected and tuple(state[k].shape) != tuple(expected[k].shape)
               for k in HEAD_KEYS):
            skipped = tuple(k for k in HEAD_KEYS if k in expected)
            state = {k: v for k, v in state.items() if k not in HEAD_KEYS}
    check_fit(model, state, skip=skipped)
    # Not strict: check_fit has already refused everything except the skipped head and missing counters.
    model.load_state_dict(state, strict=False)
    return list(skipped)
