"""OpenAI-compatible judge: a chat-completions server reads a rubric, the label odds come from logprobs.

Works with the OpenAI API and with servers that speak its protocol (llama.cpp's server, vLLM,
...). Each order of each pair is one chat completion: an optional system message (the rubric's
``system``) and a user message (the rendered rubric), ``temperature=0``, a few ``max_tokens``,
``logprobs=True`` and ``top_logprobs``. All ``2N`` requests of a batch go to a bounded thread
pool together.

Deadline and retries: each request (one order of one pair) has ``timeout`` seconds in all, from
its first connect to its last byte, its retries and their backoff included
(:mod:`oaif.annotators.deadline` enforces it at the socket, so a server that trickles bytes is
cut at the deadline). A connection error, HTTP 408/409/429 or 5xx is retried up to
``max_retries`` times with backoff (the server's Retry-After, else 0.5 s doubling to 8 s) as long
as the backoff ends before the deadline; otherwise the request fails with that error's reason. A
batch therefore takes at most ``ceil(2N / concurrency) * timeout`` seconds.

Responses and the prompt are data: look-alikes of the rubric's delimiter tags are neutralized,
and so are the special-token strings of common chat templates (``<|im_end|>`` becomes
``< |im_end|>``, see :func:`~oaif.annotators.untrusted.neutralize_special_strings`), because the
server tokenizes the message text itself and would read them as real special tokens.

Reading the preference from one response (``read_preference``):

1. Skip the leading generated tokens that are whitespace or a piece of the rubric's
   ``answer_prefix`` (``"Answer: "`` -> ``Answer``, ``:``); compared stripped and case-insensitively.
2. The *answer position* is the first remaining token whose stripped text is a label; when no
   generated token is a label, it is the first remaining token (a chatty judge that starts
   "The most helpful ..." still ranks the labels among that position's ``top_logprobs``).
3. At the answer position, each label's logprob is read from ``top_logprobs`` (entries whose
   stripped text equals the label are summed, so ``"1"`` and ``" 1"`` count together), and
   ``P(label 1) = softmax`` over the two. When only one label is listed, the other is taken to
   have the smallest listed logprob: it has *at most* that, so the result is a bound towards 0.5
   and ``extra["bound"]`` is true. When neither is listed, the reading falls through to step 4.
4. Without logprobs (the server sent none, or no label was listed), the text is parsed strictly:
   after stripping (and removing the ``answer_prefix``) it must be exactly one label, giving 1.0 or
   0.0 (``extra["mode"] == "text"``); anything else fails as ``"unparseable"`` with the raw text.

Labels must be single tokens for the logprob reading; longer labels only work in text mode.
Faults are failures, never labels: ``timeout``, ``connection_error``, ``http_<status>``
(after the SDK's retries), ``bad_response`` (not JSON, or not the expected shape), ``nan``
(a non-finite logprob) and ``unparseable``. When either order fails, the pair fails with that
order's reason. The API key is read from the environment and never logged or shown.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Sequence

from oaif.annotators.base import Judgment, PairRequest, checked, combine_orders
from oaif.annotators.deadline import call_with_retries, install_deadline, retryable_status
from oaif.annotators.rubrics import Rubric
from oaif.annotators.untrusted import neutralize_special_strings
from oaif.errors import AnnotatorError
from oaif.redaction import redact_text, remember
from oaif.stats import sigmoid

log = logging.getLogger("oaif.annotators")

RAW_TEXT_LIMIT = 200  # characters of raw judge text kept in Judgment.extra
ERROR_TEXT_LIMIT = 200  # characters of an error message kept in logs and extra


class ReadError(Exception):
    """A response could not be read; ``reason`` is the failure name."""

    def __init__(self, reason: str, detail: str = "", **extra: Any):
        super().__init__(detail or reason)
        self.reason = reason
        self.extra = extra


@dataclass
class Reading:
    """P(first response better) from one order, with how it was read."""

    prob: float
    mode: str  # "logprobs" or "text"
    bound: bool = False
    position: int | None = None
    logprobs: dict = field(default_factory=dict)  # label -> logprob used (None: not listed)


def _prefix_pieces(answer_prefix: str) -> set[str]:
    pieces = {p.lower() for p in re.findall(r"\w+|[^\w\s]+", answer_prefix)}
    if answer_prefix.strip():
        pieces.add(answer_prefix.strip().lower())
    return pieces


def _get(obj: Any, key: str) -> Any:
    """Attribute or mapping access (SDK models, or dicts when the SDK could not build a model)."""
    if isinstance(obj, dict):
        return obj.get(key)
    return getattr(obj, key)


def _logsumexp(values: list[float]) -> float:
    m = max(values)
    if not math.isfinite(m):
        return m
    return m + math.log(sum(math.exp(v - m) for v in values))


def _finite(x: Any) -> float:
    v = float(x)
    if not math.isfinite(v):
        raise ReadError("nan", f"non-finite logprob {x!r}")
    return v


def parse_text(text: str, labels: Sequence[str], answer_prefix: str = "") -> float | None:
    """Strict text parse: 1.0 for label 1, 0.0 for label 2, None for anything else."""
    answer = text.strip()
    prefix = answer_prefix.strip()
    if prefix and answer.lower().startswith(prefix.lower()):
        answer = answer[len(prefix):].strip()
    if answer == labels[0]:
        return 1.0
    if answer == labels[1]:
        return 0.0
    return None


def read_preference(choice: Any, labels: Sequence[str], answer_prefix: str = "") -> Reading:
    """P(label 1) from one chat-completion choice; see the module docstring for the rule.

    Raises :class:`ReadError` (``nan``, ``unparseable``); any other exception means the
    response did not have the expected shape.
    """
    message = _get(choice, "message")
    text = _get(message, "content")
    if text is not None and not isinstance(text, str):
        raise TypeError(f"message content is {type(text).__name__}, not text")
    text = text or ""
    logprobs = _get(choice, "logprobs")
    content = _get(logprobs, "content") if logprobs is not None else None
    if content:
        reading = _read_logprobs(content, labels, answer_prefix)
        if reading is not None:
            return reading
    prob = parse_text(text, labels, answer_prefix)
    if prob is None:
        raise ReadError("unparseable", "answer is not a label", raw=text[:RAW_TEXT_LIMIT])
    return Reading(prob=prob, mode="text")


def _read_logprobs(content: Sequence[Any], labels: Sequence[str], answer_prefix: str) -> Reading | None:
    skip = _prefix_pieces(answer_prefix)
    tokens = [_get(t, "token") for t in content]
    if not all(isinstance(t, str) for t in tokens):
        raise TypeError("logprob token is not text")
    start = 0
    while start < len(tokens) and (not tokens[start].strip() or tokens[start].strip().lower() in skip):
        start += 1
    if start == len(tokens):
        return None
    position = next((i for i in range(start, len(tokens)) if tokens[i].strip() in labels), start)
    entry = content[position]
    listed: list[tuple[str, float]] = [(_get(t, "token"), _finite(_get(t, "logprob")))
                                       for t in (_get(entry, "top_logprobs") or [])]
    own = (tokens[position], _finite(_get(entry, "logprob")))
    if own[0] not in {tok for tok, _ in listed}:
        listed.append(own)  # some servers leave the sampled token out of top_logprobs
    per_label: list[float | None] = []
    for label in labels:
        values = [lp for tok, lp in listed if isinstance(tok, str) and tok.strip() == label]
        per_label.append(_logsumexp(values) if values else None)
    if per_label[0] is None and per_label[1] is None:
        return None
    bound = per_label[0] is None or per_label[1] is None
    floor = min(lp for _, lp in listed)
    lp1 = per_label[0] if per_label[0] is not None else floor
    lp2 = per_label[1] if per_label[1] is not None else floor
    prob = sigmoid(lp1 - lp2)
    if not math.isfinite(prob):
        raise ReadError("nan", "non-finite probability")
    return Reading(prob=prob, mode="logprobs", bound=bound, position=position,
                   logprobs={labels[0]: per_label[0], labels[1]: per_label[1]})


def _deadline_http_client(openai, name: str):
    """The SDK's default httpx client with :func:`~oaif.annotators.deadline.install_deadline` applied."""
    http_client = openai.DefaultHttpxClient()
    if not install_deadline(http_client):
        log.warning("%s: this httpx version hides its connection pool, so annotator.request_timeout bounds "
                    "each network read, not the whole request", name)
    return http_client


class OpenAIJudge:
    """A pairwise judge behind an OpenAI-compatible chat-completions endpoint."""

    def __init__(self, base_url: str | None, model: str, rubric: Rubric, *, api_key_env: str = "OPENAI_API_KEY",
                 timeout: float = 30.0, max_retries: int = 2, concurrency: int = 8, both_orders: bool = True,
                 top_logprobs: int = 5, max_tokens: int = 8, name: str | None = None):
        try:
            import openai
        except ImportError:
            raise AnnotatorError("annotator.type=openai needs the openai SDK: pip install 'oaif[openai]'") from None
        for arg, value, ok, rule in (("concurrency", concurrency, concurrency >= 1, ">= 1"),
                                     ("top_logprobs", top_logprobs, top_logprobs >= 1, ">= 1"),
                                     ("max_tokens", max_tokens, max_tokens >= 1, ">= 1"),
                                     ("timeout", timeout, timeout > 0, "> 0"),
                                     ("max_retries", max_retries, max_retries >= 0, ">= 0")):
            if not ok:
                raise AnnotatorError(f"openai judge: {arg} must be {rule}, got {value}")
        self._openai = openai
        self.base_url = base_url
        remember(base_url or "")  # credentials in the URL (and the Basic header made of them) stay out of errors
        self.model = model
        self.rubric = rubric
        self.api_key_env = api_key_env
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.concurrency = int(concurrency)
        self.both_orders = both_orders
        self.top_logprobs = int(top_logprobs)
        self.max_tokens = int(max_tokens)
        self.name = name or f"openai:{model}"
        key = os.environ.get(api_key_env) or "not-needed"
        # Kept only to scrub it from error text; never logged, never in repr.
        self._secret = key if key != "not-needed" else None
        # retries are made here, inside the deadline (the SDK's own would sleep past it)
        self._client = openai.OpenAI(base_url=base_url, api_key=key, timeout=self.timeout, max_retries=0,
                                     http_client=_deadline_http_client(openai, self.name))

    def __repr__(self) -> str:
        return (f"OpenAIJudge(name={self.name!r}, base_url={redact_text(str(self.base_url))!r}, model={self.model!r}, "
                f"rubric={self.rubric.name!r}, both_orders={self.both_orders})")

    __str__ = __repr__

    def close(self) -> None:
        """Close the HTTP connection pool (the judge is unusable afterwards)."""
        self._client.close()

    # -- one request -------------------------------------------------------------------------
    def messages(self, context: str, first: str, second: str) -> list[dict]:
        """The chat messages of one order; special-token strings in the values are broken up."""
        values = [neutralize_special_strings(v) for v in (context, first, second)]
        out = [{"role": "system", "content": self.rubric.system}] if self.rubric.system else []
        out.append({"role": "user", "content": self.rubric.render(*values)})
        return out

    def _scrub(self, text: str) -> str:
        text = str(text)
        if self._secret:
            text = text.replace(self._secret, "***")
        return redact_text(text)[:ERROR_TEXT_LIMIT]  # and the credentials of base_url

    def _ask(self, context: str, first: str, second: str) -> tuple[Reading | ReadError, float]:
        """P(first better) for one order, or the reason it failed; with the request's latency.

        The whole request, retries and backoff included, ends by ``timeout`` seconds from now.
        """
        t0 = time.perf_counter()
        response, error = call_with_retries(lambda left: self._send(context, first, second, left), self.timeout,
                                            self.max_retries)
        latency = time.perf_counter() - t0
        if error is not None:
            return error, latency
        try:
            choices = _get(response, "choices")
            if not choices:
                raise ValueError("no choices")
            return read_preference(choices[0], self.rubric.labels, self.rubric.answer_prefix), latency
        except ReadError as e:
            return e, latency
        except Exception as e:
            return ReadError("bad_response", self._scrub(f"{type(e).__name__}: {e}")), latency

    def _send(self, context: str, first: str, second: str, left: float):
        """One attempt: ``(response, None, None)``, or ``(None, error, retry headers or None when final)``."""
        openai = self._openai
        if left <= 0:
            return None, ReadError("timeout", "deadline passed before the request was sent"), None
        try:
            response = self._client.chat.completions.create(
                model=self.model, messages=self.messages(context, first, second), max_tokens=self.max_tokens,
                temperature=0, logprobs=True, top_logprobs=self.top_logprobs, timeout=left)
        except openai.APITimeoutError as e:  # a subclass of APIConnectionError: test it first
            return None, ReadError("timeout", self._scrub(e)), None
        except openai.APIConnectionError as e:
            return None, ReadError("connection_error", self._scrub(e)), {}
        except openai.APIStatusError as e:
            retry = e.response.headers if retryable_status(e.status_code) else None
            return None, ReadError(f"http_{e.status_code}", self._scrub(e)), retry
        except Exception as e:  # a body the SDK could not decode, or anything else unexpected
            return None, ReadError("bad_response", self._scrub(f"{type(e).__name__}: {e}")), None
        return response, None, None

    # -- a batch ---------------------------------------------------------------------------
    def annotate(self, requests: Sequence[PairRequest]) -> list[Judgment]:
        requests = list(requests)
        if not requests:
            return []
        orders = 2 if self.both_orders else 1
        jobs = []
        for r in requests:
            jobs.append((r.prompt, r.a, r.b))
            if self.both_orders:
                jobs.append((r.prompt, r.b, r.a))
        spans: list[tuple[float, float] | None] = [None] * len(jobs)
        lock = threading.Lock()

        def run(i: int):
            start = time.perf_counter()
            out = self._ask(*jobs[i])
            with lock:
                spans[i] = (start, time.perf_counter())
            return out

        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(jobs)),
                                thread_name_prefix="oaif-openai") as pool:
            results = list(pool.map(run, range(len(jobs))))

        judgments = []
        for k, r in enumerate(requests):
            idx = list(range(k * orders, (k + 1) * orders))
            latency = max(spans[i][1] for i in idx) - min(spans[i][0] for i in idx)
            judgments.append(self._judgment(r, [results[i][0] for i in idx], latency))
        return judgments

    def _judgment(self, request: PairRequest, readings: list[Reading | ReadError], latency: float) -> Judgment:
        for order, reading in zip(("ab", "ba"), readings):
            if isinstance(reading, ReadError):
                log.warning("%s: pair %r failed (%s, order %s): %s", self.name, request.prompt_id, reading.reason,
                            order, self._scrub(str(reading)))
                extra = {k: self._scrub(v) if isinstance(v, str) else v for k, v in reading.extra.items()}
                return Judgment.failed(reading.reason, self.name, latency, order=order,
                                       error=self._scrub(str(reading)), **extra)
        extra: dict[str, Any] = {"mode": readings[0].mode}
        if any(r.mode != readings[0].mode for r in readings):
            extra["mode"] = "mixed"
        if any(r.bound for r in readings):
            extra["bound"] = True
        extra["logprobs_ab"] = readings[0].logprobs or None
        prob_ab = readings[0].prob
        if not self.both_orders:
            j = checked(prob_ab, self.name, latency, **extra)
            if j.ok:
                j.prob_ab = prob_ab
            return j
        extra["logprobs_ba"] = readings[1].logprobs or None
        prob_ba = 1.0 - readings[1].prob  # b was shown first: P(first better) is P(b better)
        return combine_orders(prob_ab, prob_ba, self.name, latency, **extra)
