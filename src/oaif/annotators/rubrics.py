"""Rubrics: the judge's instructions as a template file plus the answer labels.

A rubric file is YAML with these keys:

``template``  (required) text with the variables ``{context}``, ``{response_1}`` and
              ``{response_2}``; write a literal brace as ``{{`` or ``}}``.
``labels``    the two answers that mean "response 1 is better" and "response 2 is better"
              (default ``["1", "2"]``).
``system``    optional system message for chat judges.
``answer_prefix``  optional text that starts the judge's answer; the label follows it.
``name``, ``description``  for logs and reports.

Shipped rubrics live in ``oaif/rubrics/``; ``annotator.rubric`` takes their name or a path.
The responses and context are data: :meth:`Rubric.clean` rewrites anything that looks like one of
the template's delimiter tags, near misses included (see :mod:`oaif.annotators.untrusted`), so a
response cannot close its block and pose as the judge's instructions.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import yaml

from oaif.annotators.untrusted import neutralize_tags, slot, tag_names
from oaif.errors import AnnotatorError

REQUIRED_VARIABLES = ("context", "response_1", "response_2")
RUBRIC_DIR = Path(__file__).resolve().parent.parent / "rubrics"


def sanitize(text: str) -> str:
    """Neutralize look-alikes of the shipped rubrics' delimiter tags so text stays inside its own block."""
    return neutralize_tags(text)


@dataclass(frozen=True)
class Rubric:
    name: str
    template: str
    labels: tuple[str, str] = ("1", "2")
    system: str | None = None
    answer_prefix: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        fields = set()
        try:
            for _, name, _, _ in string.Formatter().parse(self.template):
                if name is not None:
                    fields.add(name)
        except ValueError as e:
            raise AnnotatorError(f"rubric {self.name!r}: bad template ({e}); write literal braces as {{{{ }}}}") from None
        missing = [v for v in REQUIRED_VARIABLES if v not in fields]
        if missing:
            raise AnnotatorError(f"rubric {self.name!r}: template lacks variable(s) {', '.join('{' + m + '}' for m in missing)}")
        unknown = sorted(fields - set(REQUIRED_VARIABLES))
        if unknown:
            raise AnnotatorError(f"rubric {self.name!r}: unknown template variable(s) {', '.join('{' + u + '}' for u in unknown)}")
        if len(self.labels) != 2 or self.labels[0] == self.labels[1] or not all(self.labels):
            raise AnnotatorError(f"rubric {self.name!r}: labels must be two different non-empty strings, got {self.labels!r}")

    @cached_property
    def tag_names(self) -> list[str]:
        """The delimiter tag names of this template (and the shipped ones)."""
        return tag_names(self.template)

    def clean(self, text: str) -> str:
        """Untrusted text with every look-alike of this template's delimiter tags neutralized."""
        return neutralize_tags(text, self.tag_names)

    def render(self, context: str, response_1: str, response_2: str) -> str:
        """The judge's user message for one order of one pair."""
        return self.template.format(context=self.clean(context), response_1=self.clean(response_1),
                                    response_2=self.clean(response_2))

    def render_slots(self) -> str:
        """The user message with :func:`~oaif.annotators.untrusted.slot` placeholders for the three values."""
        return self.template.format(**{name: slot(name) for name in REQUIRED_VARIABLES})


def shipped_rubrics() -> list[str]:
    return sorted(p.stem for p in RUBRIC_DIR.glob("*.yaml"))


def load_rubric(name_or_path: str) -> Rubric:
    """Load a shipped rubric by name, or a rubric YAML file by path."""
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = RUBRIC_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise AnnotatorError(f"unknown rubric {name_or_path!r}: not a file, and not one of the shipped rubrics "
                                 f"({', '.join(shipped_rubrics())})")
    if not path.is_file():
        raise AnnotatorError(f"rubric file {path} is a directory, not a file" if path.is_dir()
                             else f"rubric file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise AnnotatorError(f"rubric {path}: cannot read it as UTF-8 text ({e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise AnnotatorError(f"rubric {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict) or "template" not in data:
        raise AnnotatorError(f"rubric {path}: needs a 'template' key")
    allowed = {"name", "template", "labels", "system", "answer_prefix", "description"}
    extra = sorted(set(data) - allowed)
    if extra:
        raise AnnotatorError(f"rubric {path}: unknown key(s) {', '.join(extra)}")
    return Rubric(name=str(data.get("name", path.stem)), template=str(data["template"]),
                  labels=tuple(str(x) for x in data.get("labels", ("1", "2"))),
                  system=data.get("system"), answer_prefix=str(data.get("answer_prefix", "")),
                  description=str(data.get("description", "")))
