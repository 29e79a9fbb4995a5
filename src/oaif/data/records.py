"""The records data is made of: a prompt, a preference pair, and the sets a loader returns.

A prompt is plain text or a list of chat messages (``{"role": ..., "content": ...}``); records
check their fields when built, so a value of the wrong type is a :class:`DataError`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field as _field
from typing import Any, Generic, TypeVar

from oaif.errors import DataError


Messages = list[dict[str, str]]
Prompt = str | Messages

_ROLE_NAMES = {"user": "User", "assistant": "Assistant", "system": "System"}


def _check_prompt(prompt: Any) -> Prompt:
    """Return ``prompt`` as text or as a clean list of ``{"role", "content"}`` dicts.

    Raises :class:`DataError` (without location; callers add it) when ``prompt`` is neither.
    Keys other than ``role`` and ``content`` are dropped.
    """
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, (list, tuple)):
        messages: Messages = []
        for i, msg in enumerate(prompt):
            if not isinstance(msg, dict):
                raise DataError(f"message {i} is a {type(msg).__name__}, expected an object with role and content")
            role, content = msg.get("role"), msg.get("content")
            if not isinstance(role, str) or not role:
                raise DataError(f"message {i} has no text 'role' (got {role!r})")
            if not isinstance(content, str):
                raise DataError(f"message {i} ({role}) has no text 'content' (got {type(content).__name__})")
            messages.append({"role": role, "content": content})
        return messages
    raise DataError(f"expected text or a list of chat messages, got {type(prompt).__name__}")


def messages_to_text(prompt: Prompt) -> str:
    """Flatten a prompt to plain text (for judges, and for tokenizers without a chat template).

    Text is returned unchanged; messages become ``"User: ...\\n\\nAssistant: ...\\n\\nUser: ..."``
    in conversation order (so the last user turn comes last).
    """
    if isinstance(prompt, str):
        return prompt
    return "\n\n".join(f"{_ROLE_NAMES.get(m['role'], m['role'].capitalize())}: {m['content']}" for m in prompt)


def _is_empty(prompt: Prompt) -> bool:
    if isinstance(prompt, str):
        return not prompt.strip()
    return not any(m["content"].strip() for m in prompt)


@dataclass(frozen=True)
class PromptRecord:
    """One prompt: plain text or a list of chat messages (``{"role": str, "content": str}``)."""

    id: str
    prompt: Prompt

    def __post_init__(self) -> None:
        if not isinstance(self.id, str):
            raise DataError(f"prompt id must be a string, got {type(self.id).__name__}")
        object.__setattr__(self, "prompt", _check_prompt(self.prompt))

    @property
    def text(self) -> str:
        """The prompt as plain text (messages flattened as ``Role: content`` turns)."""
        return messages_to_text(self.prompt)

    @property
    def is_empty(self) -> bool:
        """True for whitespace-only text, no messages, or messages with only whitespace content."""
        return _is_empty(self.prompt)


@dataclass(frozen=True)
class PreferenceRecord:
    """A prompt with a preferred (``chosen``) and a dispreferred (``rejected``) response.

    ``prob`` is P(chosen is better) in [0, 1] when the source gives one, else ``None`` (a hard label).
    """

    id: str
    prompt: Prompt
    chosen: str
    rejected: str
    prob: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.id, str):
            raise DataError(f"preference id must be a string, got {type(self.id).__name__}")
        object.__setattr__(self, "prompt", _check_prompt(self.prompt))
        for name in ("chosen", "rejected"):
            if not isinstance(getattr(self, name), str):
                raise DataError(f"'{name}' must be text, got {type(getattr(self, name)).__name__}")
        if self.prob is not None:
            object.__setattr__(self, "prob", _check_prob(self.prob))

    @property
    def text(self) -> str:
        """The prompt as plain text (messages flattened as ``Role: content`` turns)."""
        return messages_to_text(self.prompt)


def _check_prob(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 <= float(value) <= 1.0):
        raise DataError(f"probability must be a number in [0, 1], got {value!r}")
    return float(value)


R = TypeVar("R")


@dataclass
class _LoadedSet(Generic[R]):
    records: list[R]
    skipped: Counter = _field(default_factory=Counter)  # reason -> rows skipped
    rows: int = 0  # data rows read from the source, kept or skipped

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[R]:
        return iter(self.records)


@dataclass
class PromptSet(_LoadedSet[PromptRecord]):
    """Result of :func:`~oaif.data.prompts.load_prompts`: the usable ``records``, ``skipped``
    counts by reason (``"empty"``; ``"too_long"`` once :func:`~oaif.data.split.filter_long` is
    applied with ``skipped=``) and the number of ``rows`` read."""


@dataclass
class PreferenceSet(_LoadedSet[PreferenceRecord]):
    """Result of :func:`~oaif.data.preferences.load_preferences` /
    :func:`~oaif.data.hh.load_hh_pairs`: usable ``records``, ``skipped`` counts by reason
    (``"empty_prompt"``, ``"empty_response"``, ``"identical"``, ``"context_mismatch"``,
    ``"unparseable"``) and the number of ``rows`` read."""
