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
