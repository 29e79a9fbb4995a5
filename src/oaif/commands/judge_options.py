"""The annotator options that ``oaif annotate`` and ``oaif eval`` share.

``--annotator-config FILE.yaml`` and ``--set key=value`` become an
:class:`~oaif.config.AnnotatorConfig` through :func:`oaif.config.load_annotator_config`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from typing import Iterator


def add_annotator_arguments(parser: argparse.ArgumentParser, example: str) -> None:
    """The ``annotator`` argument group; ``example`` shows ``--set`` items in the help."""
    g = parser.add_argument_group("annotator")
    g.add_argument("--annotator-config", metavar="FILE.yaml",
                   help="YAML with an `annotator:` group, or annotator keys at its top level")
    g.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help=f"annotator key override, repeatable (e.g. {example})")


def refuse_policy_judge(cfg) -> None:
    """``annotator.model=policy`` judges with the policy being trained, which these commands do not have:
    one line before any work."""
    from oaif.annotators.build import NO_POLICY, judges_with_policy
    from oaif.errors import ConfigError

    if judges_with_policy(cfg):
        raise ConfigError(NO_POLICY)


@contextlib.contextmanager
def quiet_judges(verbose: bool) -> Iterator[None]:
    """Unless ``verbose``, hide the judges' per-pair warnings (too_long, callable errors) for the
    block: the commands summarise them as failure counts instead."""
    judge_log = logging.getLogger("oaif.annotators")
    level = judge_log.level
    if not verbose:
        judge_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        judge_log.setLevel(level)
