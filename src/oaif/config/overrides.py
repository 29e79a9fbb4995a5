"""Setting config keys with type checks: a mapping onto a group, ``key.sub=value`` overrides, the
lossless coercions (int -> float, ``yes``/``no`` for booleans), and the unknown-key hint."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import TYPE_CHECKING, Any

import yaml

from oaif.config.schema import type_name
from oaif.config.yaml_io import WORD_BOOLS, parse_yaml
from oaif.errors import ConfigError

if TYPE_CHECKING:
    from oaif.config.schema import Config


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotated type ``tp``; convert only lossless cases (int -> float)."""
    if isinstance(value, str) and not value.isascii():  # a lone UTF-16 surrogate ("\ud800" in YAML, or bytes
        try:                                            # that are not UTF-8 on the command line) is not text
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigError(f"{key}: not text (a lone UTF-16 surrogate, or bytes that are not UTF-8)") from None
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{key}: expected {' or '.join(type_name(a) for a in args)}, got {short(value)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in WORD_BOOLS:
            return WORD_BOOLS[value.lower()]
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is list or origin is list:
        if isinstance(value, list):
            return list(value)
    else:  # pragma: no cover - every field type is one of the above
        return value
    raise ConfigError(f"{key}: expected {type_name(tp)}, got {short(value)}")


def _unknown(key: str, known: list[str]) -> ConfigError:
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, known, n=1)
    hint = f" (did you mean '{key.rsplit('.', 1)[0] + '.' if '.' in key else ''}{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def apply_mapping(obj: Any, data: dict, prefix: str = "") -> None:
    """Set every key of the mapping ``data`` on the config group ``obj`` (nested groups recursively);
    ``prefix`` is the group's dotted name in messages."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {short(data)}")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in names:
            raise _unknown(key, names)
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            apply_mapping(current, value, key + ".")
        else:
            setattr(obj, name, _coerce(key, value, hints[name]))


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key.sub=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = parse_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def set_key(cfg: Config, key: str, value: Any) -> None:
    """Set a dotted ``key`` on ``cfg`` with type checking (strings stay strings for str fields)."""
    parts = key.split(".")
    obj: Any = cfg
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(obj)]
        if part not in names:
            raise _unknown(".".join(parts[: i + 1]), names)
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(getattr(obj, part)):
                apply_mapping(getattr(obj, part), value, key + ".")
                return
            tp = typing.get_type_hints(type(obj))[part]
            if isinstance(value, (int, float, bool)) and not isinstance(value, bool) and _accepts_str_only(tp):
                value = str(value)
            setattr(obj, part, _coerce(key, value, tp))
            return
        obj = getattr(obj, part)
        if not dataclasses.is_dataclass(obj):
            raise ConfigError(f"unknown config key '{key}' ('{'.'.join(parts[: i + 1])}' is not a group)")


def _accepts_str_only(tp: Any) -> bool:
    args = typing.get_args(tp) or (tp,)
    return str in args and not ({int, float} & set(args))


def flatten(d: dict, prefix: str = "") -> dict:
    """A nested config dict as ``{"group.key": value}`` (the names ``key=value`` overrides use)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
