"""YAML as oaif reads it: YAML 1.2 booleans (``no``/``off`` stay strings), a mapping key given
twice refused, a file that is missing, binary or not UTF-8 a one-line :class:`ConfigError`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from oaif.errors import ConfigError


class _Loader(yaml.SafeLoader):
    """YAML with 1.2's booleans: only true/false. YAML 1.1 reads no/off/yes/on as booleans, which
    would turn the documented ``train.mixed_precision=no`` into False; here they stay strings (and
    bool keys accept them, :mod:`oaif.config.overrides`)."""


_BOOL_TAG = "tag:yaml.org,2002:bool"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
WORD_BOOLS = {"yes": True, "on": True, "no": False, "off": False}


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def read_yaml(path: str | Path, what: str = "config") -> Any:
    """The parsed YAML of a file; a missing, unreadable, binary or non-UTF-8 file is a one-line ConfigError."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{what} file {p} is a directory")
    if not p.is_file():
        raise ConfigError(f"{what} file not found: {p}")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{what} file {p}: cannot read it ({e.strerror or e})") from None
    if b"\0" in raw:
        raise ConfigError(f"{what} file {p}: binary data, not YAML text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} file {p}: not UTF-8 text (byte {e.start})") from None
    try:
        duplicate = _duplicate_key(yaml.compose(text, Loader=_Loader))
        data = parse_yaml(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if duplicate:
        raise ConfigError(f"{p}: {duplicate}")
    return {} if data is None else data


def _duplicate_key(node: Any) -> str | None:
    """'key 'x' appears twice (line N)' for the first mapping key given twice (YAML would keep the last)."""
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else None
            if name is not None and name in seen:
                return f"key '{name}' appears twice (line {key.start_mark.line + 1}); YAML would silently keep the last"
            seen.add(name)
            found = _duplicate_key(value)
            if found:
                return found
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            found = _duplicate_key(item)
            if found:
                return found
    return None


def dump_yaml(cfg) -> str:
    """A :class:`~oaif.config.schema.Config` as YAML, in its groups' order (a run's ``config.yaml``)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
