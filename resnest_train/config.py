"""The experiment config: frozen dataclasses, YAML loading with `base:` inheritance, dotted overrides.

Flow (STYLE.md): YAML (`yaml.safe_load`) -> base files merged (later wins) -> `KEY=VALUE` overrides, each
VALUE parsed as YAML -> strict `from_dict` into frozen dataclasses. Strict means: an unknown key is an
error naming the closest valid key; values are coerced to the field type (PyYAML reads `5e-4` as a
string); a bool field takes only booleans; choices and ranges are checked in `__post_init__`.
Every user error is a `ConfigError`, which the CLIs print as one `error: ...` line with exit code 2.
A key written twice in one YAML mapping is an error too (PyYAML silently keeps the last one).
The defaults are the ResNeSt-50 recipe (docs/RECIPE.md) and equal `configs/base.yaml`, key for key
(tests/test_config.py checks it); derived values (scaled lr, resize sizes) are computed by their users.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from resnest_train.errors import UserError


class ConfigError(UserError, ValueError):
    """A user error in a config file, an override or a path the config names."""


MAX_CLASSES = 1_000_000
MAX_IMAGE_SIZE = 4096
MAX_SEED = 2**32 - 1


def _check_choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"'{key}' must be one of {', '.join(map(str, choices))}, got {value!r}")


def _check_range(key: str, value: float, low: float | None = None, high: float | None = None,
                 low_open: bool = False) -> None:
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and value > high
    if too_low or too_high:
        low_s = "-inf" if low is None else str(low)
        high_s = "inf" if high is None else str(high)
        bracket = "(" if low_open else "["
        raise ConfigError(f"'{key}' must be in {bracket}{low_s}, {high_s}], got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    name: str = "resnest50"
    num_classes: int = 1000
    dropout: float = 0.0
    zero_init_last_bn: bool = True
    dropblock_prob: float = 0.1
    pretrained: str | None = None
    sync_bn: bool = False

    def __post_init__(self):
        _check_range("model.num_classes", self.num_classes, 1, MAX_CLASSES)
        _check_range("model.dropout", self.dropout, 0.0, 1.0)
        _check_range("model.dropblock_prob", self.dropblock_prob, 0.0, 1.0)
        # Imported here: the model registry pulls in torch, which the config itself does not need.
        from resnest_train.models import list_models
        if self.name not in list_models():
            close = difflib.get_close_matches(self.name, list_models(), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"'model.name': unknown model '{self.name}'{hint}")


@dataclass(frozen=True)
class DataConfig:
    backend: str = "dali"
    root: str = "data/imagenet"
    synthetic_size: int = 1024
    dali_device: str = "auto"
    workers: int = 4
    crop_size: int = 224
    rrc_scale: tuple[float, float] = (0.08, 1.0)
    hflip: bool = True
    autoaugment: str = "imagenet"
    autoaugment_on: str = "image"
    color_jitter: float = 0.4
    lighting: float = 0.1
    val_crop_size: int = 224
    val_resize_ratio: float = 0.875
    val_resize_size: int | None = None
    interpolation: str = "bilinear"

    def __post_init__(self):
        _check_choice("data.backend", self.backend, ("dali", "torchvision", "synthetic"))
        _check_choice("data.dali_device", self.dali_device, ("auto", "cpu", "gpu"))
        _check_choice("data.autoaugment", self.autoaugment, ("imagenet", "none"))
        _check_choice("data.autoaugment_on", self.autoaugment_on, ("image", "crop"))
        _check_choice("data.interpolation", self.interpolation, ("bilinear", "bicubic"))
        _check_range("data.synthetic_size", self.synthetic_size, 1)
        _check_range("data.workers", self.workers, 0, 256)
        _check_range("data.crop_size", self.crop_size, 8, MAX_IMAGE_SIZE)
        _check_range("data.val_crop_size", self.val_crop_size, 8, MAX_IMAGE_SIZE)
        _check_range("data.val_resize_ratio", self.val_resize_ratio, 0.1, 1.0)
        if self.val_resize_size is not None:
            _check_range("data.val_resize_size", self.val_resize_size, self.val_crop_size, MAX_IMAGE_SIZE)
        _check_range("data.color_jitter", self.color_jitter, 0.0, 1.0)
        _check_range("data.lighting", self.lighting, 0.0)
        low, high = self.rrc_scale
        if not 0.0 < low <= high <= 1.0:
            raise ConfigError(f"'data.rrc_scale' must satisfy 0 < min <= max <= 1, got {list(self.rrc_scale)}")


@dataclass(frozen=True)
class OptimConfig:
    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1.0e-4
    no_bn_bias_decay: bool = True

    def __post_init__(self):
        _check_choice("optim.name", self.name, ("sgd",))
        _check_range("optim.lr", self.lr, 0.0, low_open=True)
        _check_range("optim.momentum", self.momentum, 0.0, 1.0)
        _check_range("optim.weight_decay", self.weight_decay, 0.0)


@dataclass(frozen=True)
class ScheduleConfig:
    warmup_epochs: float = 5
    name: str = "cosine"
    min_lr: float = 0.0

    def __post_init__(self):
        _check_choice("schedule.name", self.name, ("cosine",))
        _check_range("schedule.warmup_epochs", self.warmup_epochs, 0.0)
        _check_range("schedule.min_lr", self.min_lr, 0.0)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 270
    batch_size: int = 128
    label_smoothing: float = 0.1
    mixup_alpha: float = 0.2
    device: str = "auto"
    amp: str = "bf16"
    channels_last: bool = False
    compile: bool = False
    seed: int = 0
    deterministic: bool = False
    log_interval: int = 50
    eval_interval: int = 1

    def __post_init__(self):
        _check_range("train.epochs", self.epochs, 1, 100_000)
        _check_range("train.batch_size", self.batch_size, 1, 65_536)
        _check_range("train.label_smoothing", self.label_smoothing, 0.0, 1.0)
        _check_range("train.mixup_alpha", self.mixup_alpha, 0.0)
        _check_choice("train.device", self.device, ("auto", "cuda", "cpu"))
        _check_choice("train.amp", self.amp, ("none", "bf16", "fp16"))
        # The data pipelines derive per-rank seeds as seed * 1000 + rank, which must fit DALI's int64.
        _check_range("train.seed", self.seed, 0, MAX_SEED)
        _check_range("train.log_interval", self.log_interval, 1)
        _check_range("train.eval_interval", self.eval_interval, 1)
        if self.mixup_alpha > 0 and self.batch_size % 2:
            # Batch mixup pairs each image with its mirror in the batch (timm's Mixup).
            raise ConfigError(f"'train.batch_size' must be even with mixup (train.mixup_alpha > 0), "
                              f"got {self.batch_size}")


@dataclass(frozen=True)
class CheckpointConfig:
    resume: str | None = "auto"
    keep_last: int = 3
    interval_steps: int = 0
    overwrite: bool = False  # true: a fresh run (resume=null) may replace the checkpoints in output_dir

    def __post_init__(self):
        _check_range("checkpoint.keep_last", self.keep_last, 0)
        _check_range("checkpoint.interval_steps", self.interval_steps, 0)


@dataclass(frozen=True)
class Config:
    output_dir: str = "runs/resnest50"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


# ---------------------------------------------------------------------------------------------- coercion

def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Convert a YAML value to the annotated type, or raise ConfigError naming the key."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(key, value, args[0])
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"'{key}' must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"'{key}' must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"'{key}' must be an integer, got {value!r}")
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"'{key}' must be an integer, got {value!r}") from None
        if not number.is_integer():
            raise ConfigError(f"'{key}' must be an integer, got {value!r}")
        return int(number)
    if hint is float:
        # PyYAML (YAML 1.1) reads `5e-4` as a string; float() accepts it.
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"'{key}' must be a number, got {value!r}")
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"'{key}' must be a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"'{key}' must be a finite number, got {value!r}")
        return number
    if hint is str:
        if isinstance(value, (dict, list, bool)) or value is None:
            raise ConfigError(f"'{key}' must be a string, got {value!r}")
        return str(value)
    raise AssertionError(f"unsupported config type {hint} for {key}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"'{prefix.rstrip('.') or 'config'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            valid = [prefix + n for n in names]
            close = difflib.get_close_matches(prefix + str(key), valid, n=1, cutoff=0.5)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown key '{prefix}{key}'{hint}")
        hint_type = hints[key]
        if dataclasses.is_dataclass(hint_type):
            kwargs[key] = _build(hint_type, value if value is not None else {}, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(prefix + key, value, hint_type)
    return cls(**kwargs)


def from_dict(data: dict) -> Config:
    """Strictly build a Config from a plain mapping (as read from YAML)."""
    return _build(Config, data, "")


def to_dict(config: Config) -> dict:
    """Plain-data form (lists, not tuples) that round-trips through YAML and `from_dict`."""
    def plain(value):
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value
    return plain(dataclasses.asdict(config))


def to_yaml(config: Config, header: str = "") -> str:
    """The config as YAML that `load_config` reads back; `header` lines are written as comments."""
    comments = "".join(f"# {line}\n" for line in header.splitlines())
    return comments + yaml.safe_dump(to_dict(config), sort_keys=False)


# ---------------------------------------------------------------------------------------------- loading

def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class _DuplicateKey(Exception):
    def __init__(self, key, line: int):
        super().__init__(key, line)
        self.key, self.line = key, line


class _StrictLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key written twice in one mapping is refused."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise _DuplicateKey(key, key_node.start_mark.line + 1)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in chain:
        raise ConfigError(f"config file includes itself through 'base': {path}")
    if path.is_dir():
        raise ConfigError(f"config file is a directory: {path}")
    try:
        data = yaml.load(path.read_text(), Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as exc:
        raise ConfigError(f"duplicate key '{exc.key}' in {path} line {exc.line}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"cannot parse YAML in {path}{where}: {getattr(exc, 'problem', exc)}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    bases = data.pop("base", None)
    if bases is None:
        return data
    merged: dict = {}
    for base in [bases] if isinstance(bases, str) else list(bases):
        if not isinstance(base, str):
            raise ConfigError(f"'base' in {path} must be a path or a list of paths, got {base!r}")
        merged = _merge(merged, _read_yaml(path.parent / base, chain + (path.resolve(),)))
    return _merge(merged, data)


def parse_override(text: str) -> dict:
    """`optim.lr=0.2` -> {'optim': {'lr': 0.2}}; the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}' must look like KEY=VALUE (e.g. optim.lr=0.2)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise ConfigError(f"override '{text}': cannot parse the value as YAML") from None
    parts = key.strip().split(".")
    if _is_section(parts) and not isinstance(value, dict):
        raise ConfigError(f"override '{text}': '{key.strip()}' is a section; override its keys "
                          f"(e.g. {key.strip()}.name=...) or give a mapping")
    nested: Any = value
    for part in reversed(parts):
        nested = {part: nested}
    return nested


def _is_section(parts: list[str]) -> bool:
    cls: Any = Config
    for part in parts:
        fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
        if part not in fields:
            return False
        cls = typing.get_type_hints(cls)[part]
    return dataclasses.is_dataclass(cls)


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (with its bases), apply dotted overrides, validate strictly."""
    data = _read_yaml(Path(path))
    for text in overrides:
        data = _merge(data, parse_override(text))
    return from_dict(data)
