"""The Python API: ``oaif.load_config``, ``oaif.train`` and its ``oaif.TrainResult``.

The config stays the single source of truth: every argument of :func:`train` becomes config keys
(the ``key.sub=value`` overrides ``oaif train`` takes, or mappings of a group's keys as in the
YAML file), and the run's ``config.yaml`` records them. Prompts given in memory (a list, a
``datasets.Dataset``) are written to ``prompts-<hash>.jsonl`` in the run directory and
``data.path`` names that file, so they are loaded, filtered and split exactly as a prompt file is
(:func:`oaif.data.split.training_prompts`), and ``oaif eval --run`` finds their held-out part.
A Python function as the judge is recorded as ``annotator.type=callable`` with its
``module:qualname`` and judges through :class:`oaif.annotators.callable_judge.CallableJudge`.

Nothing here imports torch at module level: ``import oaif`` stays fast.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from oaif import config as _config
from oaif.config import Config
from oaif.config.overrides import parse_override
from oaif.errors import AnnotatorError, ConfigError, DataError

GROUPS = tuple(Config.__dataclass_fields__)


@dataclass
class TrainResult:
    """What :func:`train` returns.

    ``summary``: the run's summary (``steps``, ``last``: the last step's metrics as in
    ``metrics.jsonl``, ``final_checkpoint``, ``skipped_inputs``); ``checkpoint``: the final
    checkpoint directory (``AutoModelForCausalLM.from_pretrained`` loads it); ``run_dir``: the run
    directory (``train.output_dir``); ``config``: the resolved config the run trained with.
    """

    summary: dict
    checkpoint: Path
    run_dir: Path
    config: Config


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = (),
                **groups: dict) -> Config:
    """A validated :class:`oaif.Config`: the YAML file ``path`` (or the defaults), then ``overrides``
    (``"key.sub=value"`` strings, as ``oaif train`` takes them), then ``groups`` (a config group's keys
    as a mapping, as in the YAML file: ``train={"max_steps": 3}``). Bad keys or values raise
    :class:`oaif.errors.ConfigError` with a one-line message naming the key."""
    cfg = _config.load_config(path, _override_list(overrides))
    return _config.validate(_apply_groups(cfg, groups))


def _override_list(overrides) -> list[str]:
    if isinstance(overrides, str):
        return [overrides]
    if not isinstance(overrides, (list, tuple)) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError(f"overrides: expected a list of 'key.sub=value' strings, got {_short(overrides)}")
    return list(overrides)


def _apply_groups(cfg: Config, groups: dict) -> Config:
    for name, value in groups.items():
        if name not in GROUPS:
            raise ConfigError(f"unknown keyword '{name}': keywords name config groups ({', '.join(GROUPS)}), "
                              f"e.g. {_guess(name)}")
        if not isinstance(value, dict):
            raise ConfigError(f"{name}=: expected a mapping of the group's keys, e.g. {name}={{...}}, "
                              f"got {_short(value)}")
        _config.set_key(cfg, name, value)
    return cfg


def _guess(name: str) -> str:
    """A keyword that names a key inside a group, as the group mapping it belongs in."""
    for key in _config.flatten(Config().to_dict()):
        group, _, leaf = key.partition(".")
        if leaf == name:
            return f"{group}={{'{name}': ...}}"
    return "train={'max_steps': 3}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def train(config: Config | str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = (), *,
          model: str | dict | None = None, prompts: Any = None, judge: Callable | dict | None = None,
          **groups: dict) -> TrainResult:
    """Train a policy with online AI feedback (or offline, as the config says); return a :class:`TrainResult`.

    ``config``: a YAML file, an :class:`oaif.Config` (not changed; a copy is) or None (the defaults).
    ``overrides`` and ``groups``: as :func:`load_config`. Then:

    - ``model``: the policy, ``model.name_or_path`` (a hub id in the local cache, a directory, a
      ``.gguf`` file or ``smollm2-135m-instruct``), or a mapping of ``model`` keys.
    - ``prompts``: a prompt file (``data.path``), or in memory: a list of strings, of chat
      conversations (lists of ``{"role", "content"}``) or of rows (dicts with ``data.field`` and an
      optional ``id``), or a ``datasets.Dataset`` with a ``data.field`` column.
    - ``judge``: a function of ``(prompt, a, b)`` returning P(a is better), or of ``(prompt, response)``
      returning a score (P(a better) = sigmoid(score(a) - score(b))); or a mapping of ``annotator`` keys,
      e.g. ``{"rubric": "helpful_short", "model": "smollm2-135m-instruct"}`` (an in-process judge) or
      ``{"type": "openai", "base_url": "http://127.0.0.1:8080/v1", "model": "...", "rubric": "helpful"}``.

    Bad input raises an :class:`oaif.errors.OaifError` subclass with a one-line message.
    """
    from oaif.redaction import remember

    cfg = _base_config(config, overrides, groups)
    if model is not None:
        _config.set_key(cfg, "model", model if isinstance(model, dict) else {"name_or_path": _text(model, "model")})
    annotator = _set_judge(cfg, judge)
    if prompts is not None:
        _set_prompts(cfg, prompts)
    _config.validate(cfg)
    remember(cfg.to_dict())  # credentials in its URLs are redacted from here on
    from oaif.trainer import train as run_training

    summary = run_training(cfg, annotator=annotator)
    return TrainResult(summary, Path(summary["final_checkpoint"]), Path(cfg.train.output_dir), cfg)


def _base_config(config, overrides, groups) -> Config:
    if isinstance(config, Config):
        cfg = copy.deepcopy(config)
        for item in _override_list(overrides):
            _config.set_key(cfg, *parse_override(item))
        return _config.validate(_apply_groups(cfg, groups))
    if config is not None and not isinstance(config, (str, os.PathLike)):
        raise ConfigError(f"config: expected a YAML file, an oaif.Config or None, got {type(config).__name__}")
    return load_config(config, overrides, **groups)


def _text(value: Any, name: str) -> str:
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise ConfigError(f"{name}: expected a model name or path (or a mapping of {name} keys), got {_short(value)}")
    return os.fspath(value)


# -- the judge ---------------------------------------------------------------------------------
def _set_judge(cfg: Config, judge: Any):
    """Put ``judge`` into ``cfg.annotator``; return the annotator object to use (a function's), or None."""
    if judge is None:
        return None
    if isinstance(judge, dict):
        _config.set_key(cfg, "annotator", judge)
        return None
    if isinstance(judge, (str, os.PathLike)) or not callable(judge):
        raise AnnotatorError(f"judge: expected a function of (prompt, a, b) or (prompt, response), or a mapping of "
                             f"annotator keys such as {{'rubric': 'helpful', 'model': ...}}, got {_short(judge)}")
    from oaif.annotators.callable_judge import CallableJudge

    built = CallableJudge(judge, both_orders=cfg.annotator.both_orders)  # its arguments checked
    name = f"{getattr(judge, '__module__', None) or '__main__'}:{getattr(judge, '__qualname__', type(judge).__name__)}"
    _config.set_key(cfg, "annotator", {"type": "callable", "callable": name})
    return built


# -- prompts in memory ---------------------------------------------------------------------------
def _set_prompts(cfg: Config, prompts: Any) -> None:
    """Point ``data.path`` at ``prompts``: a file as it is, prompts in memory written to the run directory."""
    if isinstance(prompts, (str, os.PathLike)):
        _config.set_key(cfg, "data.path", os.fspath(prompts))
        return
    rows = _prompt_rows(prompts, cfg.data.field)
    from oaif.run.run_dir import check_output_dir

    out = check_output_dir(cfg.train.output_dir)
    text = "".join(json.dumps(row) + "\n" for row in rows)  # ASCII: a lone surrogate is escaped, as in a file
    name = f"prompts-{hashlib.sha256(text.encode()).hexdigest()[:12]}.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    target = out / name
    if not target.is_file() or target.read_text(encoding="utf-8") != text:
        tmp = out / f".{name}.{os.getpid()}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, target)  # atomic: another process writing the same file is harmless
    _config.set_key(cfg, "data", {"path": str(Path(cfg.train.output_dir) / name), "format": "jsonl"})


def _prompt_rows(prompts: Any, field: str) -> list[dict]:
    """``prompts`` as JSONL rows ``{"id": ..., field: prompt}`` (the row's ``id``, else its index, as a file's
    loader names it), each prompt checked as a file's row is; a missing prompt is written as null (skipped as empty)."""
    from oaif.data.records import PromptRecord
    from oaif.data.rows import _row_id

    rows, seen = [], {}
    for i, item in enumerate(_prompt_items(prompts, field)):
        if isinstance(item, dict) and field not in item:
            raise DataError(f"prompts[{i}] is a chat message; pass a list of conversations: [[{{'role': 'user', "
                            f"'content': ...}}], ...]" if "role" in item else
                            f"prompts[{i}]: no field '{field}' (keys: {', '.join(map(str, item)) or 'none'}); "
                            f"set data={{'field': ...}}")
        row = item if isinstance(item, dict) else {field: item}
        value = None if _is_missing(row[field]) else row[field]  # written as null: the loader skips it as empty
        rid = _row_id(row, i)
        try:
            prompt = None if value is None else PromptRecord(id=rid, prompt=value).prompt
        except DataError as e:
            raise DataError(f"prompts[{i}]: {e}") from None
        if rid in seen:
            raise DataError(f"prompts[{i}]: duplicate id '{rid}' (first at prompts[{seen[rid]}]); ids must be unique")
        seen[rid] = i
        rows.append({"id": rid, field: prompt})
    return rows


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _prompt_items(prompts: Any, field: str) -> list:
    datasets = sys.modules.get("datasets")  # a Dataset means datasets is imported already
    if datasets is not None and isinstance(prompts, datasets.DatasetDict):
        raise DataError(f"prompts: a DatasetDict ({', '.join(prompts)}); pass one split, e.g. prompts=ds['train']")
    if datasets is not None and isinstance(prompts, datasets.Dataset):
        if field not in prompts.column_names:
            raise DataError(f"prompts: the Dataset has no column '{field}' (columns: "
                            f"{', '.join(prompts.column_names)}); set data={{'field': ...}}")
        return list(prompts)
    if not isinstance(prompts, (list, tuple)):
        raise DataError(f"prompts: expected a prompt file, a list of prompts or a datasets.Dataset, "
                        f"got {type(prompts).__name__}")
    if not prompts:
        raise DataError("prompts: the list is empty")
    return list(prompts)
