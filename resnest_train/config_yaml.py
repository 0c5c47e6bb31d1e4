"""Reading configs: YAML with `base:` inheritance and duplicate-key checks, dotted `KEY=VALUE` overrides,
and the strict conversion of plain data into the dataclasses of config.py (and back).

Strict means: an unknown key is an error naming the closest valid key; values are coerced to the field type
(PyYAML reads `5e-4` as a string); a bool field takes only booleans; a section is only ever replaced by a
mapping. Every error is a `ConfigError` naming the key, file or line.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from resnest_train.config import Config, ConfigError

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
        if len(args) == 2 and args[1] is Ellipsis:  # tuple[str, ...]: a list of any length
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"'{key}' must be a list, got {value!r}")
            return tuple(_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
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

