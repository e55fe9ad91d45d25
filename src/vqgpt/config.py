"""Dataclass configs: YAML <-> dataclass, dotted overrides, unknown keys are errors."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
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


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build dataclass `cls` from a mapping; unknown keys are errors naming the key."""
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


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] | None = None) -> T:
    """Read YAML `path` (or nothing), apply dotted overrides, build `cls`."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    apply_overrides(data, list(overrides or []))
    try:
        return from_dict(cls, data)
    except ConfigError as err:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{err}") from None


def save_config(cfg: Any, path: str | Path) -> None:
    """Write a dataclass config as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ---------------------------------------------------------------------------------------------
# quantizer

QUANTIZER_PRESETS: dict[str, dict[str, Any]] = {
    # The seed write-up's VectorQuantizer: gradient-trained codebook, uniform(-1/K, 1/K) init.
    "seed": dict(
        ema=False,
        kmeans_init=False,
        restart_after_steps=0,
        l2_normalize=False,
        codebook_dim=None,
        levels=1,
        init="uniform",
    ),
    # What we recommend: EMA codebook, k-means init, dead-code restarts.
    "default": dict(ema=True, kmeans_init=True, restart_after_steps=20, init="normal"),
}


@dataclass
class QuantizerConfig:
    """Vector quantizer options (math in DESIGN.md)."""

    PRESETS: typing.ClassVar[dict[str, dict[str, Any]]] = QUANTIZER_PRESETS

    preset: str | None = None  # "seed" | "default": fills the fields it names, explicit keys win
    codebook_size: int = 1024  # K
    codebook_dim: int | None = None  # factorised codes: project to this dim and search there
    l2_normalize: bool = False  # search / store l2-normalised codes (cosine similarity)
    beta: float = 0.25  # commitment weight
    levels: int = 1  # residual quantisation depth
    init: str = "normal"  # "uniform" (seed: U(-1/K, 1/K)) | "normal"
    ema: bool = True  # EMA codebook updates instead of the codebook loss
    ema_decay: float = 0.99
    ema_eps: float = 1e-5  # Laplace smoothing of the cluster sizes
    kmeans_init: bool = True  # k-means on the first training batch
    kmeans_iters: int = 10
    restart_after_steps: int = 20  # a code unused this many steps is re-seeded (0 = never)
    warmup_steps: int = 0  # training steps with the quantizer bypassed; k-means init right after
    warmup_steps: int = 0  # training steps with the quantizer bypassed; k-means init right after
    chunk_size: int = 256  # rows of the search per chunk: peak memory O(chunk_size * K); see
    # scripts/bench_quantizer.py (small blocks stay in cache: faster than bigger ones on CPU)

    def __post_init__(self) -> None:
        # presets are expanded by `from_dict` / `from_preset`, before the fields are set
        if self.preset is not None and self.preset not in QUANTIZER_PRESETS:
            raise ConfigError(
                f"quantizer preset {self.preset!r} is unknown; known: {sorted(QUANTIZER_PRESETS)}"
            )
        if self.codebook_size < 2:
            raise ConfigError("quantizer.codebook_size must be at least 2")
        if self.codebook_dim is not None and self.codebook_dim < 1:
            raise ConfigError("quantizer.codebook_dim must be positive or null")
        if self.levels < 1:
            raise ConfigError("quantizer.levels must be at least 1")
        if self.init not in ("uniform", "normal"):
            raise ConfigError("quantizer.init must be 'uniform' or 'normal'")
        if not 0.0 < self.ema_decay < 1.0:
            raise ConfigError("quantizer.ema_decay must be in (0, 1)")
        if self.chunk_size < 1:
            raise ConfigError("quantizer.chunk_size must be positive")
        if self.warmup_steps < 0:
            raise ConfigError("quantizer.warmup_steps must be >= 0")
        if self.warmup_steps < 0:
            raise ConfigError("quantizer.warmup_steps must be >= 0")
        if self.restart_after_steps < 0:
            raise ConfigError("quantizer.restart_after_steps must be >= 0")

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> QuantizerConfig:
        """The named preset's values with `overrides` on top."""
        return from_dict(cls, {"preset": name, **overrides})


__all__ = [
    "ConfigError",
    "QuantizerConfig",
    "QUANTIZER_PRESETS",
    "apply_overrides",
    "from_dict",
    "load_config",
    "save_config",
    "to_dict",
]
