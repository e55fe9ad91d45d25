"""Dataclass configs: YAML <-> dataclass, dotted overrides, unknown keys are errors.

YAML is read with the YAML 1.2 core schema (`parse_yaml`): only true/false are booleans, so
`mixed_precision: no` is the text "no", not False (YAML 1.1's yes/no/on/off/y/n booleans are
what every YAML 1.1 reader gets wrong). A string field takes the text as written even where it
looks like a number (`revision: 1.10` is "1.10", not 1.1): the parser keeps the source text of
every plain scalar that became a bool or a number, and `from_dict` uses it for `str` fields.
A value of the wrong type is an error that names where it came from: the override `key=value`,
or the recipe file and key.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
import warnings
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import yaml

from vqgpt.errors import VqgptError
from vqgpt.files import read_text, write_text
from vqgpt.recipes import find_config, packaged_recipes

T = TypeVar("T")


class ConfigError(VqgptError, ValueError):
    """A config file or override that does not fit its dataclass.

    `key` is the dotted key (e.g. 'train.batch_size') the error is about, when there is one.
    """

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


# ---------------------------------------------------------------------------------------------
# YAML 1.2 core schema

BOOL_TAG, INT_TAG, FLOAT_TAG = (f"tag:yaml.org,2002:{t}" for t in ("bool", "int", "float"))
_FLOAT = re.compile(
    r"^[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?$"
    r"|^[-+]?[0-9]+[eE][-+]?[0-9]+$"
    r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"
)


class Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with the YAML 1.2 core schema's scalars: booleans are true/false
    (yes, no, on, off, y, n stay text), integers are decimal, no sexagesimal numbers, no dates."""

    yaml_implicit_resolvers: dict = {}

    def construct_decimal_int(self, node: yaml.ScalarNode) -> int:
        return int(self.construct_scalar(node))  # "010" is 10 (YAML 1.1 read it as octal 8)


for _tag, _regexp, _first in (
    (BOOL_TAG, r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    (INT_TAG, r"^[-+]?[0-9]+$", "-+0123456789"),
    (FLOAT_TAG, _FLOAT.pattern, "-+0123456789."),
    ("tag:yaml.org,2002:null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
    ("tag:yaml.org,2002:merge", r"^(?:<<)$", ["<"]),
):
    Yaml12Loader.add_implicit_resolver(_tag, re.compile(_regexp), list(_first))
Yaml12Loader.add_constructor(INT_TAG, Yaml12Loader.construct_decimal_int)

TEXT_TAGS = (BOOL_TAG, INT_TAG, FLOAT_TAG)  # plain scalars whose text a str field takes


class ParsedYaml(NamedTuple):
    """A YAML document and the source text of its plain booleans and numbers."""

    data: Any
    texts: dict[str, str]  # dotted key ('train.betas[0]') -> the scalar as written


def _plain_texts(node: yaml.Node, where: str, out: dict[str, str]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value != "<<":
                _plain_texts(value, f"{where}.{key.value}" if where else key.value, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, value in enumerate(node.value):
            _plain_texts(value, f"{where}[{i}]", out)
    elif node.style is None and node.tag in TEXT_TAGS:
        out[where] = node.value


def _check_unique_keys(node: yaml.Node, where: str, source: str) -> None:
    """A key given twice in one mapping is an error naming both lines (YAML 1.2 requires unique
    keys; PyYAML would keep the last silently)."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value != "<<":
                full = f"{where}.{key.value}" if where else key.value
                line = key.start_mark.line + 1
                if key.value in seen:
                    raise ConfigError(
                        f"{source}: key {full} is given twice (lines {seen[key.value]} and "
                        f"{line}); YAML keys must be unique: keep one",
                        key=full,
                    )
                seen[key.value] = line
                _check_unique_keys(value, full, source)
            else:
                _check_unique_keys(value, where, source)
    elif isinstance(node, yaml.SequenceNode):
        for i, value in enumerate(node.value):
            _check_unique_keys(value, f"{where}[{i}]", source)


def parse_yaml(text: str, where: str = "<text>") -> ParsedYaml:
    """`text` read with the YAML 1.2 core schema, with the text of its plain bools and numbers.

    Raises ConfigError naming `where` (a file) and the position when `text` is not YAML, and
    naming the key and both lines when a mapping gives one key twice.
    """
    loader = Yaml12Loader(text)
    try:
        node = loader.get_single_node()  # the tree keeps each scalar's text and style
        if node is not None:
            _check_unique_keys(node, "", where)
        data = None if node is None else loader.construct_document(node)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML ({problem}; {_mark(err)})") from None
    finally:
        loader.dispose()
    texts: dict[str, str] = {}
    if node is not None:
        _plain_texts(node, "", texts)
    return ParsedYaml(data, texts)


def _mark(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    return f"line {mark.line + 1}, column {mark.column + 1}" if mark else "position unknown"


def load_yaml(path: str | Path) -> Any:
    """The YAML document in the file `path` (UTF-8, BOM removed, YAML 1.2 core schema).

    Raises FileNotFoundError when `path` does not exist, ConfigError naming it when it is not
    YAML, FileReadError when it is not UTF-8.
    """
    return parse_yaml(read_text(path), str(path)).data


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


def _allows_none(tp: Any) -> bool:
    """Whether a field of type `tp` may hold None (`X | None`, `Optional[X]`, `Any`)."""
    if tp is Any or tp is type(None):
        return True
    origin = typing.get_origin(tp)
    return origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def _type_name(tp: Any) -> str:
    if _is_dataclass_type(tp) or typing.get_origin(tp) is dict:
        return "a mapping"
    if typing.get_origin(tp) in (list, tuple):
        return "a list"
    return getattr(tp, "__name__", str(tp))


def _shown(value: Any, where: str, texts: dict[str, str]) -> str:
    """`value` as the user wrote it: YAML's true/false, not Python's True/False."""
    if isinstance(value, bool):
        return texts.get(where, "true" if value else "false")
    return repr(value)


def _coerce(tp: Any, value: Any, where: str, texts: dict[str, str], none_ok: bool = False) -> Any:
    if value is None:
        if none_ok or _allows_none(tp):
            return None
        hint = " (to give an empty text, write '')" if _unwrap_optional(tp) is str else ""
        raise ConfigError(
            f"{where}: expected {_type_name(tp)}, got nothing (an empty value or null){hint}",
            key=where,
        )
    tp = _unwrap_optional(tp)
    if tp in (int, float) and isinstance(value, bool):  # True == 1: not a number here
        raise ConfigError(
            f"{where}: expected {tp.__name__}, got {_shown(value, where, texts)}", key=where
        )
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}", key=where)
        return from_dict(tp, value, where, texts)
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}", key=where)
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        items = [_coerce(inner, v, f"{where}[{i}]", texts) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is str and isinstance(value, (bool, int, float)) and where in texts:
        return texts[where]  # the text as written: `revision: 1.10` is "1.10"
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)  # a number given as text ("1e-4" quoted, or from code)
        except ValueError as err:
            raise ConfigError(f"{where}: expected a number, got {value!r}", key=where) from err
    if tp in (int, float, str, bool) and not isinstance(value, tp):
        hint = " (write true or false)" if tp is bool else ""
        shown = _shown(value, where, texts)
        raise ConfigError(f"{where}: expected {tp.__name__}, got {shown}{hint}", key=where)
    return value


def _renamed(cls: type, data: dict[str, Any], where: str) -> dict[str, Any]:
    """`data` with the old key names of `cls.RENAMED` ({old: new}) mapped, with a warning."""
    renamed = getattr(cls, "RENAMED", None) or {}
    prefix = f"{where}." if where else ""
    for old, new in renamed.items():
        if old not in data:
            continue
        if new in data:
            raise ConfigError(
                f"{prefix}{old} and {prefix}{new} are one setting: give only {new}",
                key=f"{prefix}{old}",
            )
        warnings.warn(
            f"{prefix}{old} is now called {prefix}{new}; the old name still works",
            FutureWarning,
            stacklevel=4,
        )
        data = {(new if k == old else k): v for k, v in data.items()}
    return data


def from_dict(
    cls: type[T], data: dict[str, Any], where: str = "", texts: dict[str, str] | None = None
) -> T:
    """Build dataclass `cls` from a mapping; unknown keys are errors naming the key.

    A class may declare `PRESETS` ({name: fields}, chosen by a `preset` key, explicit keys win)
    and `RENAMED` ({old key: new key}, old names still read, with a FutureWarning). `texts`
    ({dotted key: text}, from `parse_yaml`) gives `str` fields the text of a bool or number.
    Raises ConfigError naming the key for unknown keys, wrong types and invalid values.
    """
    texts = texts if texts is not None else {}
    data = _renamed(cls, data, where)
    hints = typing.get_type_hints(cls)
    presets = getattr(cls, "PRESETS", None)
    if presets is not None and data.get("preset") is not None:
        name = data["preset"]
        if name not in presets:
            raise ConfigError(
                f"{where or cls.__name__}: preset {name!r} is unknown; known: {sorted(presets)}",
                key=f"{where}.preset" if where else "preset",
            )
        data = {**presets[name], **data}  # explicit keys win over the preset
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)} for {cls.__name__}; "
            f"known keys: {', '.join(sorted(names))}",
            key=prefix + unknown[0],
        )
    none_ok = {f.name for f in dataclasses.fields(cls) if f.default is None}  # `x: str = None`
    kwargs = {
        k: _coerce(hints[k], v, f"{where}.{k}" if where else k, texts, k in none_ok)
        for k, v in data.items()
    }
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            if err.key is None:
                err.key = where  # a validation in __post_init__: the section it checked
            raise
        raise ConfigError(f"{where or cls.__name__}: {err}", key=where) from err


def to_dict(cfg: Any) -> dict[str, Any]:
    """Dataclass -> plain dict (tuples become lists, so the result is YAML/JSON friendly)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


def _forget(texts: dict[str, str], key: str) -> None:
    """Drop the texts of `key` and of everything under it (a new value replaced them)."""
    for k in [k for k in texts if k == key or k.startswith((f"{key}.", f"{key}["))]:
        del texts[k]


def _forget_patch(texts: dict[str, str], patch: dict[str, Any], where: str = "") -> None:
    for key, value in patch.items():
        full = f"{where}.{key}" if where else str(key)
        if isinstance(value, dict):
            _forget_patch(texts, value, full)
        else:
            _forget(texts, full)


def _override_value(raw: str, item: str) -> ParsedYaml:
    """The value of an override: `raw` (the text after `=`) read as YAML 1.2, except that `#`
    starts no comment there: a value YAML would cut at a comment (`runs/x #1`, `#1`) is the
    whole text as written."""
    parsed = parse_yaml(raw, f"override {item!r}")
    loader = Yaml12Loader(raw)
    try:
        node = loader.get_single_node()
    except yaml.YAMLError:  # parse_yaml read it: cannot happen
        node = None
    finally:
        loader.dispose()
    end = len(raw.rstrip())
    if end and (node is None or node.end_mark.index < end):
        return ParsedYaml(raw.strip(), {})
    return parsed


def apply_overrides(
    data: dict[str, Any], overrides: list[str], texts: dict[str, str] | None = None
) -> dict[str, str]:
    """Apply `a.b.c=value` overrides (values parsed as YAML 1.2) to a nested mapping, in place.

    The value is the text after the first `=`; `#` in it is text, not a comment. An empty
    value (`key=`) is null, which only a field that may be None takes.

    `texts` (the `parse_yaml` texts of `data`) is updated with each value's text. Returns
    {dotted key: the override as given}, for errors that name the override.
    Raises ConfigError for an override without `=` or one that goes through a non-section.
    """
    given: dict[str, str] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        value, value_texts = _override_value(raw, item)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section", key=key)
        node[parts[-1]] = value
        if texts is not None:
            _forget(texts, key)
            texts.update(
                {
                    key + k if k.startswith("[") else (f"{key}.{k}" if k else key): t
                    for k, t in value_texts.items()
                }
            )
        given[key] = item
    return given


def _blame(err: ConfigError, path: Path | None, given: dict[str, str]) -> str:
    """Where a config error's value came from: the override, the file, or both."""
    key = err.key or ""
    for k, item in given.items():
        if key and (key == k or key.startswith((f"{k}.", f"{k}["))):
            return f"override {item!r}"
    below = {k: item for k, item in given.items() if not key or k.startswith(f"{key}.")}
    # a section's own check (__post_init__) names the field it rejects
    named = [
        i for k, i in below.items() if re.search(rf"\b{re.escape(k.rsplit('.')[-1])}\b", str(err))
    ]
    if named:
        return " + ".join(f"override {item!r}" for item in named)
    parts = ([str(path)] if path is not None else []) + [f"override {i!r}" for i in below.values()]
    return " + ".join(parts)


def _leaf_keys(patch: dict[str, Any], where: str = "") -> list[str]:
    """The dotted keys of the values (not sections) of a nested mapping."""
    keys: list[str] = []
    for key, value in patch.items():
        full = f"{where}.{key}" if where else str(key)
        keys += _leaf_keys(value, full) if isinstance(value, dict) and value else [full]
    return keys


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
    patch_source: str | None = None,
) -> T:
    """Read YAML `path` (or nothing), `merge` the mapping `patch` over it, apply dotted
    overrides, build `cls`.

    `path` is a file, else the packaged recipe it names (`vqgpt.recipes.find_config`).
    Raises ConfigError when the file does not exist or does not fit `cls`; the message names
    where the value came from (the override `key=value`, `patch_source` for a value of `patch`,
    or the file and key).
    """
    data: dict[str, Any] = {}
    texts: dict[str, str] = {}
    if path is not None:
        found = find_config(path)
        if found is None:
            raise ConfigError(
                f"config file {path} does not exist, and it names no packaged recipe "
                f"(packaged: {', '.join(packaged_recipes())})"
            )
        path = found
        data, texts = parse_yaml(read_text(path), str(path))
        if data is None:
            raise ConfigError(
                f"{path}: the recipe holds no settings (the file is empty or only comments)"
            )
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    data = merge(data, patch or {})
    _forget_patch(texts, patch or {})
    given = apply_overrides(data, list(overrides or []), texts)
    try:
        return from_dict(cls, data, texts=texts)
    except ConfigError as err:
        key = err.key or ""
        patched = _leaf_keys(patch or {})
        if patch_source and key and not any(key == k or key.startswith(f"{k}.") for k in given):
            if any(key == k or key.startswith((f"{k}.", f"{k}[")) for k in patched):
                raise ConfigError(f"{patch_source}: {err}", key=err.key) from None
        where = _blame(err, path, given)
        raise ConfigError(f"{where}: {err}" if where else str(err), key=err.key) from None


def save_config(cfg: Any, path: str | Path) -> None:
    """Write a dataclass config as YAML (UTF-8; strings YAML 1.1 would misread are quoted)."""
    write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True))


__all__ = [
    "ConfigError",
    "ParsedYaml",
    "Yaml12Loader",
    "apply_overrides",
    "from_dict",
    "load_config",
    "load_yaml",
    "merge",
    "parse_yaml",
    "save_config",
    "to_dict",
]
