"""The annotator interface: a pairwise judge that returns preference probabilities or a failure.

An annotator is anything with a ``name`` and an ``annotate(requests)`` method that returns one
:class:`Judgment` per :class:`PairRequest`, in order. A judgment either carries the probability
that response ``a`` is better than response ``b`` or names why it failed. A failure is never a
label: the trainer masks failed pairs and counts them by reason.

Implementations compose (an ensemble holds judges, a both-orders wrapper holds a one-order
judge); none inherits behaviour from a base class. The helpers here are what every judge and
every caller of judges shares: :func:`combine_orders` and :func:`checked` build judgments;
:func:`frozen` and :func:`eval_mode` keep an in-process judge model free of gradients and dropout;
:func:`annotate_all` drives any annotator over many requests in batches; :func:`failure_counts`
counts failures by reason.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol, Sequence, runtime_checkable


@dataclass(frozen=True)
class PairRequest:
    """One comparison: which of ``a`` and ``b`` better answers ``prompt``?

    ``prompt`` is the user-facing context as plain text (a chat is flattened by the caller).
    ``prompt_id`` identifies the prompt in the audit log.
    """

    prompt: str
    a: str
    b: str
    prompt_id: str = ""


#: The failure reason of a judgment that has no probability and names no reason of its own.
NO_PROB = "no_prob"


@dataclass
class Judgment:
    """The outcome of one :class:`PairRequest`.

    ``prob`` is P(a better than b) after averaging the orders, or ``None`` when ``failure``
    names the reason (``"timeout"``, ``"http_error"``, ``"unparseable"``, ``"nan"``, ...).
    ``prob_ab`` is P(a better) read with ``a`` shown first; ``prob_ba`` is P(a better) read
    with ``b`` shown first (already mapped back to ``a``). ``extra`` holds judge-specific
    diagnostics (per-judge probabilities of an ensemble, raw text of a parse, ...).
    """

    prob: float | None
    failure: str | None = None
    prob_ab: float | None = None
    prob_ba: float | None = None
    latency_s: float = 0.0
    judge: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.failure is None and self.prob is not None

    @property
    def failure_reason(self) -> str | None:
        """Why it failed, as training (``failed/<reason>``), eval and annotate count it; ``None`` when ``ok``."""
        return None if self.ok else (self.failure or NO_PROB)

    @property
    def consistent(self) -> bool | None:
        """Whether both orders pick the same winner (None when only one order was read)."""
        if self.prob_ab is None or self.prob_ba is None:
            return None
        return (self.prob_ab > 0.5) == (self.prob_ba > 0.5)

    def prob_for(self, sent_as_a: bool = True) -> float | None:
        """P(a given response better): the response sent as ``a`` when ``sent_as_a``, else the one
        sent as ``b``; ``None`` when the judgment failed."""
        if not self.ok:
            return None
        return float(self.prob) if sent_as_a else 1.0 - float(self.prob)

    @classmethod
    def failed(cls, reason: str, judge: str = "", latency_s: float = 0.0, **extra) -> "Judgment":
        return cls(prob=None, failure=reason, judge=judge, latency_s=latency_s, extra=dict(extra))


def combine_orders(prob_ab: float | None, prob_ba: float | None, judge: str, latency_s: float = 0.0,
                   **extra) -> Judgment:
    """Average the two order readings into one judgment; a missing or NaN reading fails it."""
    for p in (prob_ab, prob_ba):
        if p is None:
            return Judgment.failed("missing_order", judge, latency_s, **extra)
        if not math.isfinite(p) or not 0.0 <= p <= 1.0:
            return Judgment.failed("nan", judge, latency_s, **extra)
    return Judgment(prob=(prob_ab + prob_ba) / 2, prob_ab=prob_ab, prob_ba=prob_ba,
                    latency_s=latency_s, judge=judge, extra=dict(extra))


def checked(prob: float | None, judge: str, latency_s: float = 0.0, **extra) -> Judgment:
    """A one-order judgment, failed as ``"nan"`` when ``prob`` is not a finite probability."""
    if prob is None or not math.isfinite(prob) or not 0.0 <= prob <= 1.0:
        return Judgment.failed("nan", judge, latency_s, **extra)
    return Judgment(prob=float(prob), latency_s=latency_s, judge=judge, extra=dict(extra))


@runtime_checkable
class Annotator(Protocol):
    """A pairwise judge. ``annotate`` returns one :class:`Judgment` per request, in order."""

    name: str

    def annotate(self, requests: Sequence[PairRequest]) -> list[Judgment]: ...


def failure_counts(judgments: Sequence[Judgment]) -> dict[str, int]:
    """Failed judgments by reason (sorted by reason)."""
    return dict(sorted(Counter(j.failure_reason for j in judgments if not j.ok).items()))


def annotate_all(annotator: Annotator, requests: Sequence[PairRequest], batch_size: int, *, progress: bool = False,
                 desc: str = "annotate", on_batch: Callable[[list[Judgment]], dict | None] | None = None
                 ) -> list[Judgment]:
    """``annotator.annotate`` over ``requests`` in batches of ``batch_size``, with a progress bar.

    An annotator that returns another number of judgments than it was given requests breaks the
    protocol: :class:`~oaif.errors.AnnotatorError`. ``on_batch(judgments so far)`` may return a
    dict to show beside the bar.
    """
    from tqdm.auto import tqdm

    from oaif.errors import AnnotatorError

    judgments: list[Judgment] = []
    step = max(1, batch_size)
    with tqdm(total=len(requests), unit="pair", desc=desc, disable=not progress, mininterval=1.0,
              dynamic_ncols=True) as bar:
        for start in range(0, len(requests), step):
            chunk = requests[start:start + step]
            out = annotator.annotate(chunk)
            if len(out) != len(chunk):
                name = getattr(annotator, "name", type(annotator).__name__)
                raise AnnotatorError(f"annotator {name} returned {len(out)} judgments for {len(chunk)} pairs")
            judgments.extend(out)
            bar.update(len(chunk))
            if on_batch is not None:
                postfix = on_batch(judgments)
                if postfix:
                    bar.set_postfix(postfix, refresh=False)
    return judgments


@contextlib.contextmanager
def eval_mode(model) -> Iterator:
    """Run ``model`` in eval mode (no dropout) for the block, then restore each submodule's own
    train/eval mode (a training policy may hold submodules in eval mode; they stay so)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def frozen(model, device=None):
    """Prepare a model loaded only to judge: no gradients, eval mode, moved to ``device`` when given."""
    model.requires_grad_(False)
    model.eval()
    if device is not None:
        model.to(device)
    return model
