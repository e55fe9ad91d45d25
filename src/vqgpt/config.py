"""Dataclass configs: YAML <-> dataclass, dotted overrides, unknown keys are errors."""

from __future__ import annotations

import dataclasses
import types
import typing
import warnings
from pathlib import Path
from typing import Any, TypeVar

import yaml

from vqgpt.errors import VqgptError

T = TypeVar("T")


class ConfigError(VqgptError, ValueError):
    """A config file or override that does not fit its dataclass."""


# ---------------------------------------------------------------------------------------------
# generic mechanics


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _unwrap_optional(tp: Any) -> Any:
    """`X | None` -> X; anything else unchanged."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _coerce(tp: Any, value: Any, where: str) -> Any:
    if value is None:
        return None
    tp = _unwrap_optional(tp)
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        items = [_coerce(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads "1e-4" as a string
        except ValueError as err:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from err
    if tp in (int, float, str, bool) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def _renamed(cls: type, data: dict[str, Any], where: str) -> dict[str, Any]:
    """`data` with the old key names of `cls.RENAMED` ({old: new}) mapped, with a warning."""
    renamed = getattr(cls, "RENAMED", None) or {}
    prefix = f"{where}." if where else ""
    for old, new in renamed.items():
        if old not in data:
            continue
        if new in data:
            raise ConfigError(f"{prefix}{old} and {prefix}{new} are one setting: give only {new}")
        warnings.warn(
            f"{prefix}{old} is now called {prefix}{new}; the old name still works",
            FutureWarning,
            stacklevel=4,
        )
        data = {(new if k == old else k): v for k, v in data.items()}
    return data


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from a mapping; unknown keys are errors naming the key.

    A class may declare `PRESETS` ({name: fields}, chosen by a `preset` key, explicit keys win)
    and `RENAMED` ({old key: new key}, old names still read, with a FutureWarning).
    """
    data = _renamed(cls, data, where)
    hints = typing.get_type_hints(cls)
    presets = getattr(cls, "PRESETS", None)
    if presets is not None and data.get("preset") is not None:
        name = data["preset"]
        if name not in presets:
            raise ConfigError(
                f"{where or cls.__name__}: preset {name!r} is unknown; known: {sorted(presets)}"
            )
        data = {**presets[name], **data}  # explicit keys win over the preset
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)} for {cls.__name__}; "
            f"known keys: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{where or cls.__name__}: {err}") from err


def to_dict(cfg: Any) -> dict[str, Any]:
    """Dataclass -> plain dict (tuples become lists, so the result is YAML/JSON friendly)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (values parsed as YAML) to a nested mapping, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = value
    return data


def merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """`base` with `patch` on top: mappings merge key by key, any other value replaces."""
    out = dict(base)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(
    cls: type[T],
    path: str | Path | None,
    overrides: list[str] | None = None,
    patch: dict[str, Any] | None = None,
) -> T:
    """Read YAML `path` (or nothing), `merge` the mapping `patch` over it, apply dotted
    overrides, build `cls`."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    data = merge(data, patch or {})
    apply_overrides(data, list(overrides or []))
    try:
        return from_dict(cls, data)
    except ConfigError as err:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{err}") from None


def save_config(cfg: Any, path: str | Path) -> None:
    """Write a dataclass config as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


__all__ = [
    "ConfigError",
    "apply_overrides",
    "from_dict",
    "load_config",
    "merge",
    "save_config",
    "to_dict",
]
