"""Credentials kept out of everything oaif writes or prints.

A URL may carry credentials (``http://user:KEY@host/v1`` in ``annotator.base_url`` or
``vllm.server_url``), and an HTTP client sends them as an ``Authorization: Basic <base64>``
header that a careless server may echo into an error. :func:`redact_text` replaces a URL's user
information with ``***``, and every credential :func:`remember` has seen (the user information,
its password, their base64 form) wherever it appears; :func:`redact` does both to every string
of a config dict. The run directory's files, the reports, and the CLI's output, error and log
lines go through them (:class:`RedactingFilter` on the log handlers).
"""

from __future__ import annotations

import base64
import logging
import re
from typing import Any
from urllib.parse import unquote

HIDDEN = "***"
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/\s@?#]+)@")
_SECRETS: frozenset[str] = frozenset()  # replaced, never changed in place: judge threads log concurrently


def remember(obj: Any) -> None:
    """Note the credentials of every URL in ``obj`` (a string, or a config dict or list), so that they
    are redacted wherever they show up later, also in the forms an HTTP client derives from them."""
    global _SECRETS
    found = set()
    for text in _strings(obj):
        for m in _USERINFO.finditer(text):
            for raw in {m["userinfo"], unquote(m["userinfo"])}:
                password = raw.partition(":")[2]
                found.update(x for x in (raw, password, base64.b64encode(raw.encode()).decode()) if len(x) >= 4)
    if not found <= _SECRETS:
        _SECRETS = _SECRETS | found


def _strings(obj: Any):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _strings(v)


def redact_text(text: str) -> str:
    """``text`` with the user information of URLs, and every credential :func:`remember` saw, replaced by ``***``."""
    if "@" in text:
        text = _USERINFO.sub(lambda m: f"{m['scheme']}{HIDDEN}@", text)
    for secret in sorted(_SECRETS, key=len, reverse=True):
        text = text.replace(secret, HIDDEN)
    return text


def redact(obj: Any) -> Any:
    """A copy of ``obj`` (dicts, lists, tuples, strings, scalars) with :func:`redact_text` applied to every
    string, after :func:`remember` has noted the credentials of its URLs."""
    remember(obj)
    return _redacted(obj)


def _redacted(obj: Any) -> Any:
    if isinstance(obj, str):
        return redact_text(obj)
    if isinstance(obj, dict):
        return {k: _redacted(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_redacted(v) for v in obj)
    return obj


class RedactingFilter(logging.Filter):
    """A handler filter that redacts each record's formatted message (and its traceback text)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact_text(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        return True
