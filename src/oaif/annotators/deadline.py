"""A deadline for each judge request, enforced at the socket, and the retry policy that lives inside it.

httpx's timeouts bound each network operation (a connect, one read, one write), not a request: a
server that sends one byte a second never trips a 3-second read timeout and holds the request
for as long as it likes. :func:`install_deadline` wraps the network backend of an httpx client
(composition: the wrapper holds the real backend and its streams) so that every connect, read
and write made by a thread inside :func:`request_deadline` waits at most until that thread's
deadline, and fails as a timeout once it has passed, whatever the server does. The OpenAI SDK
reports that as ``APITimeoutError``.

Retries happen inside the same deadline (:func:`call_with_retries`): a retry is made only if
its backoff ends before the deadline, so a request never takes longer than its deadline,
retries included. This module reaches one level into httpx and httpcore (the transport's connection
pool and its ``_network_backend``); :func:`install_deadline` returns False when a future version
moves them, and the judge then says so in a warning.
"""

from __future__ import annotations

import contextlib
import random
import sys
import threading
import time
from typing import Any, Callable, Iterator

_local = threading.local()


class Deadline:
    """A point in ``time.monotonic()`` time."""

    def __init__(self, seconds: float):
        self.at = time.monotonic() + seconds

    def remaining(self) -> float:
        return self.at - time.monotonic()


@contextlib.contextmanager
def request_deadline(seconds: float) -> Iterator[Deadline]:
    """Network operations of this thread inside the block end by ``seconds`` from now."""
    previous = getattr(_local, "deadline", None)
    deadline = _local.deadline = Deadline(seconds)
    try:
        yield deadline
    finally:
        _local.deadline = previous


def _clamp(timeout: float | None, error: type[Exception]) -> float | None:
    """``timeout`` shortened to what is left of this thread's deadline; ``error`` once it has passed."""
    deadline = getattr(_local, "deadline", None)
    if deadline is None:
        return timeout
    left = deadline.remaining()
    if left <= 0:
        raise error("the request's deadline (annotator.request_timeout) has passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream:
    """A network stream whose every read and write ends by the current thread's deadline."""

    def __init__(self, stream: Any, errors: Any):
        self._stream = stream
        self._errors = errors

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, _clamp(timeout, self._errors.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        return self._stream.write(buffer, _clamp(timeout, self._errors.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, ssl_context, server_hostname: str | None = None, timeout: float | None = None):
        inner = self._stream.start_tls(ssl_context, server_hostname, _clamp(timeout, self._errors.ConnectTimeout))
        return _DeadlineStream(inner, self._errors)

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class _DeadlineBackend:
    """A network backend whose connects, and the streams they open, end by the current thread's deadline."""

    def __init__(self, backend: Any, errors: Any):
        self._backend = backend
        self._errors = errors

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options=None):
        stream = self._backend.connect_tcp(host, port, timeout=_clamp(timeout, self._errors.ConnectTimeout),
                                           local_address=local_address, socket_options=socket_options)
        return _DeadlineStream(stream, self._errors)

    def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options=None):
        stream = self._backend.connect_unix_socket(path, timeout=_clamp(timeout, self._errors.ConnectTimeout),
                                                   socket_options=socket_options)
        return _DeadlineStream(stream, self._errors)

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


def install_deadline(http_client: Any) -> bool:
    """Make every transport of the httpx ``http_client`` honour :func:`request_deadline`.

    Returns True when each transport's connection pool got the deadline backend (call it before
    the first request), False when the client's layout is not the one this module knows.
    """
    transports = [getattr(http_client, "_transport", None), *getattr(http_client, "_mounts", {}).values()]
    pools = [getattr(t, "_pool", None) for t in transports if t is not None]
    if not pools or any(getattr(p, "_network_backend", None) is None for p in pools):
        return False
    for pool in pools:
        errors = sys.modules[type(pool).__module__.split(".")[0]]  # httpcore (or httpcore2): its timeout errors
        if not all(hasattr(errors, name) for name in ("ReadTimeout", "WriteTimeout", "ConnectTimeout")):
            return False
        if not isinstance(pool._network_backend, _DeadlineBackend):
            pool._network_backend = _DeadlineBackend(pool._network_backend, errors)
    return True


#: HTTP statuses worth another try (as the OpenAI SDK retries them).
RETRY_STATUSES = frozenset({408, 409, 429})
BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 8.0


def retryable_status(status: int) -> bool:
    return status in RETRY_STATUSES or status >= 500


def retry_wait(attempt: int, headers: Any = None) -> float:
    """Seconds before retry ``attempt + 1``: the server's Retry-After (up to 60 s) when it sends
    one, else 0.5 s doubling per attempt up to 8 s, less up to 25% jitter."""
    if headers is not None:
        for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
            try:
                value = float(headers.get(name)) * scale
            except (TypeError, ValueError):
                continue
            if 0 <= value <= 60:
                return value
    return min(BACKOFF_START_S * 2 ** attempt, BACKOFF_MAX_S) * (1 - 0.25 * random.random())


def call_with_retries(attempt: Callable[[float], tuple[Any, Any, Any]], seconds: float, max_retries: int) -> tuple[Any, Any]:
    """Run ``attempt(seconds_left)`` under a deadline of ``seconds``, retrying while it allows.

    ``attempt`` returns ``(result, None, None)`` on success, or ``(None, error, retry)`` where
    ``retry`` is None for a final error and the response headers (a mapping, maybe empty) for one
    worth retrying. Returns ``(result, None)`` or ``(None, last error)``: after ``max_retries``
    retries, a final error, or when the next backoff would end past the deadline.
    """
    with request_deadline(seconds) as deadline:
        tries = 0
        while True:
            result, error, retry = attempt(deadline.remaining())
            if error is None:
                return result, None
            if retry is None or tries >= max_retries:
                return None, error
            wait = retry_wait(tries, retry)
            if wait >= deadline.remaining():
                return None, error
            time.sleep(wait)
            tries += 1
