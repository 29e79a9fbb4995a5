"""Typed run configuration: grouped dataclasses, loaded from YAML, with ``key.sub=value`` overrides.

Loading is strict: an unknown key, a value of the wrong type, or a missing file is a
:class:`~oaif.errors.ConfigError` whose one-line message names the offending key. The parts:
:mod:`~oaif.config.schema` (the groups and their help), :mod:`~oaif.config.yaml_io` (YAML 1.2
reading, duplicate keys), :mod:`~oaif.config.overrides` (typed setting of keys),
:mod:`~oaif.config.validate` (ranges and choices) and :mod:`~oaif.config.load` (file plus items).
Everything users import is here: ``from oaif.config import Config, load_config``.
"""

from oaif.config.load import load_annotator_config, load_config
from oaif.config.overrides import flatten, set_key
from oaif.config.schema import (AnnotatorConfig, Config, DataConfig, LoggingConfig, LoraConfig, LossConfig,
                                ModelConfig, OptimConfig, POLICY_JUDGE, SamplingConfig, TrainConfig, VllmConfig,
                                describe)
from oaif.config.validate import validate
from oaif.config.yaml_io import dump_yaml

__all__ = ["AnnotatorConfig", "Config", "DataConfig", "LoggingConfig", "LoraConfig", "LossConfig", "ModelConfig",
           "OptimConfig", "POLICY_JUDGE", "SamplingConfig", "TrainConfig", "VllmConfig", "describe", "dump_yaml", "flatten",
           "load_annotator_config", "load_config", "set_key", "validate"]
