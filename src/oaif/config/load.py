"""A :class:`~oaif.config.schema.Config` (or an annotator group) from a YAML file and ``key=value``
items, checked (:func:`oaif.config.validate.validate`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from oaif.config.overrides import apply_mapping, parse_override, set_key, short
from oaif.config.schema import AnnotatorConfig, Config
from oaif.config.validate import validate
from oaif.config.yaml_io import read_yaml
from oaif.errors import ConfigError


def _expect_mapping(data: Any, p: str | Path, what: str) -> dict:
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of {what}, got {type(data).__name__} ({short(data)})")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a :class:`Config` from an optional YAML file and ``key.sub=value`` overrides."""
    cfg = Config()
    if path is not None:
        apply_mapping(cfg, _expect_mapping(read_yaml(path), path, "config groups (model:, train:, ...)"))
    for item in overrides:
        key, value = parse_override(item)
        set_key(cfg, key, value)
    return validate(cfg)


def load_annotator_config(path: str | Path | None = None, sets: list[str] | tuple[str, ...] = ()) -> AnnotatorConfig:
    """An :class:`AnnotatorConfig` from an optional YAML file and ``key=value`` items.

    The file's ``annotator:`` group (a training config, a run's ``config.yaml``) or its top level
    holds annotator keys. Keys in ``sets`` may carry the ``annotator.`` prefix or not. Errors are
    the same one-line :class:`ConfigError` s as for a training config.
    """
    cfg = Config()
    if path is not None:
        data = _expect_mapping(read_yaml(path, "annotator config"), path, "annotator keys")
        group = data["annotator"] if "annotator" in data else data
        if not isinstance(group, dict):
            raise ConfigError(f"{path}: 'annotator' must be a mapping, got {group!r}")
        set_key(cfg, "annotator", group)
    for item in sets:
        if "=" not in item:
            raise ConfigError(f"--set '{item}' is not of the form key=value")
        key, value = parse_override(item)
        key = key[len("annotator."):] if key.startswith("annotator.") else key
        if not key:
            raise ConfigError(f"--set '{item}' has no key")
        set_key(cfg, f"annotator.{key}", value)
    return validate(cfg).annotator
