"""Callable judge: any Python function becomes an annotator, for rules and tests.

A *pairwise* function takes ``(prompt, a, b)`` and returns P(a better) in [0, 1] (a bool is
read as 1.0 / 0.0); it is asked in both orders and the readings are averaged, like an LLM judge.
A *pointwise* function takes ``(prompt, response)`` and returns a score; P(a better) is
``sigmoid(score(a) - score(b))`` (Bradley-Terry), which is symmetric in the order by itself.

An exception raised by the function masks the pair as ``callable_error``; it never becomes a label.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import math
import time
from pathlib import Path
from typing import Callable, Sequence

from oaif.annotators.base import Judgment, PairRequest, checked, combine_orders
from oaif.errors import AnnotatorError
from oaif.stats import sigmoid

log = logging.getLogger("oaif.annotators")


def resolve_callable(spec: str) -> Callable:
    """Import ``module:function`` or ``path/to/file.py:function``."""
    if ":" not in spec:
        raise AnnotatorError(f"annotator.callable {spec!r}: expected 'module:function' or 'file.py:function'")
    target, attr = spec.rsplit(":", 1)
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise AnnotatorError(f"annotator.callable: file not found: {path}")
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ImportError as e:
        raise AnnotatorError(f"annotator.callable {spec!r}: cannot import {target!r} ({e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise AnnotatorError(f"annotator.callable {spec!r}: {target!r} has no function {attr!r}")
    return fn


def _arity(fn: Callable) -> int:
    params = [p for p in inspect.signature(fn).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    return len(params)


class CallableJudge:
    """Wrap a pairwise ``(prompt, a, b) -> P(a better)`` or pointwise ``(prompt, y) -> score`` function."""

    def __init__(self, fn: Callable | str, *, kind: str = "auto", both_orders: bool = True, name: str | None = None):
        self.fn = resolve_callable(fn) if isinstance(fn, str) else fn
        if kind == "auto":
            arity = _arity(self.fn)
            if arity not in (2, 3):
                raise AnnotatorError(f"callable judge {getattr(self.fn, '__name__', self.fn)!r} must take "
                                     f"(prompt, a, b) or (prompt, response), it takes {arity} arguments")
            kind = "pairwise" if arity == 3 else "pointwise"
        if kind not in ("pairwise", "pointwise"):
            raise AnnotatorError(f"callable judge kind must be pairwise or pointwise, got {kind!r}")
        self.kind = kind
        self.both_orders = both_orders
        self.name = name or f"callable:{getattr(self.fn, '__name__', 'fn')}"

    def _score(self, prompt: str, response: str, memo: dict) -> float:
        """A pointwise score, computed once per distinct (prompt, reply) of a batch: with K samples
        paired all ways each reply is in K - 1 pairs. A raised error is not kept (a retry may pass)."""
        key = (prompt, response)
        if key not in memo:
            memo[key] = float(self.fn(prompt, response))
        return memo[key]

    def _one(self, r: PairRequest, memo: dict) -> Judgment:
        t0 = time.perf_counter()
        try:
            if self.kind == "pointwise":
                diff = self._score(r.prompt, r.a, memo) - self._score(r.prompt, r.b, memo)
                p = sigmoid(diff) if math.isfinite(diff) else float("nan")
                j = checked(p, self.name)
                j.prob_ab = j.prob_ba = j.prob
            elif self.both_orders:
                p_ab = float(self.fn(r.prompt, r.a, r.b))
                p_ba = 1.0 - float(self.fn(r.prompt, r.b, r.a))
                j = combine_orders(p_ab, p_ba, self.name)
            else:
                j = checked(float(self.fn(r.prompt, r.a, r.b)), self.name)
                j.prob_ab = j.prob
        except Exception as e:  # a rule's bug masks the pair; it is logged, never a label
            log.warning("callable judge %s raised %s: %s (pair masked)", self.name, type(e).__name__, e)
            return Judgment.failed("callable_error", self.name, time.perf_counter() - t0, error=f"{type(e).__name__}: {e}")
        j.latency_s = time.perf_counter() - t0
        return j

    def annotate(self, requests: Sequence[PairRequest]) -> list[Judgment]:
        memo: dict = {}  # one batch's pointwise scores
        return [self._one(r, memo) for r in requests]
