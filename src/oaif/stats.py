"""The statistics that `oaif eval`, `oaif annotate`, the judges and the report share: pure functions
of numbers (numpy for the bootstrap, nothing else beyond the standard library).

* :func:`sigmoid` -- the logistic function, stable for any gap (P(a better) from a score gap).
* :func:`mean` -- arithmetic mean, ``None`` for no values.
* :func:`score` and :func:`outcomes` -- a probability P(X better) scores 1 (win), 1/2 (exact tie) or
  0 (loss); the rate is the mean score, so a tie counts half.
* :func:`bootstrap_ci` -- percentile bootstrap interval of a mean (seeded).
* :func:`wilson_interval` -- Wilson score interval of a proportion (fractional successes allowed).
* :func:`percentile`, :func:`histogram_edges`, :func:`histogram`, :func:`length_stats` -- the
  distribution of response lengths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

CI_LEVEL = 0.95
Z95 = 1.959963984540054  # two-sided 95% normal quantile


def sigmoid(x: float) -> float:
    """``1 / (1 + exp(-x))`` without overflow: exactly 0.0 or 1.0 far out in the tails; NaN stays NaN."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)  # x < 0: no overflow
    return z / (1.0 + z)


def mean(xs: Sequence[float]) -> float | None:
    """The arithmetic mean, or ``None`` for an empty sequence."""
    return sum(xs) / len(xs) if xs else None


def score(p: float) -> float:
    """1 if ``p`` = P(X better) favours X, 1/2 for an exact tie (0.5), else 0."""
    return 1.0 if p > 0.5 else 0.5 if p == 0.5 else 0.0


@dataclass(frozen=True)
class Outcomes:
    """Wins, ties and losses of X over ``n`` judged comparisons; ``rate`` is the mean score."""

    scores: tuple[float, ...]
    wins: int
    ties: int
    losses: int

    @property
    def n(self) -> int:
        return len(self.scores)

    @property
    def rate(self) -> float | None:
        """Mean score (a tie counts 1/2), ``None`` when nothing was judged."""
        return mean(self.scores)


def outcomes(probs: Sequence[float]) -> Outcomes:
    """Score each P(X better) in ``probs`` and count wins, ties and losses."""
    scores = tuple(score(p) for p in probs)
    return Outcomes(scores, wins=scores.count(1.0), ties=scores.count(0.5), losses=scores.count(0.0))


def bootstrap_ci(values: Sequence[float], n: int = 1000, seed: int = 0,
                 level: float = CI_LEVEL) -> tuple[float, float] | None:
    """Percentile bootstrap interval for the mean of ``values``.

    Draws ``n`` resamples of ``len(values)`` items with replacement (numpy's PCG64 seeded with
    ``seed``), and returns the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles (linear
    interpolation) of the resample means. ``None`` for no values; a constant list gives a
    zero-width interval at that constant.
    """
    import numpy as np

    if n < 1:
        raise ValueError(f"bootstrap resamples must be >= 1, got {n}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    x = np.asarray(list(values), dtype=np.float64)
    if x.size == 0:
        return None
    rng = np.random.default_rng(seed)
    means = np.empty(n, dtype=np.float64)
    rows = max(1, 4_000_000 // x.size)  # bound the index matrix to a few tens of MB
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        idx = rng.integers(0, x.size, size=(stop - start, x.size))
        means[start:stop] = x[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    # clamp float noise (a mean of ones can read 0.9999999999999999)
    lo, hi = max(float(lo), float(x.min())), min(float(hi), float(x.max()))
    return lo, hi


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval for a proportion (``successes`` may be fractional: ties count 1/2)."""
    if n <= 0:
        return None
    p = successes / n
    denom = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(max(p * (1 - p) / n + z * z / (4 * n * n), 0.0)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) with linear interpolation (numpy's default method)."""
    xs = sorted(float(v) for v in values)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def histogram_edges(max_value: float, bins: int = 12) -> list[int]:
    """Integer bin edges from 0 that cover ``max_value``: bins ``[e_i, e_{i+1})`` of equal width."""
    width = max(1, math.ceil((max(0.0, float(max_value)) + 1) / bins))
    n = max(1, math.ceil((max(0.0, float(max_value)) + 1) / width))
    return [i * width for i in range(n + 1)]


def histogram(values: Sequence[float], edges: Sequence[float]) -> list[int]:
    """Counts per bin ``[edges[i], edges[i+1])``; the last bin also takes values equal to its right edge."""
    counts = [0] * (len(edges) - 1)
    for v in values:
        for i in range(len(counts)):
            if edges[i] <= v < edges[i + 1] or (i == len(counts) - 1 and v == edges[-1]):
                counts[i] += 1
                break
    return counts


def length_stats(values: Sequence[float], edges: Sequence[float] | None = None) -> dict:
    """Mean, median, p10, p90, min, max and a histogram (``edges``, ``counts``) of lengths."""
    xs = [float(v) for v in values]
    edges = list(edges) if edges is not None else histogram_edges(max(xs, default=0))
    return {
        "n": len(xs),
        "mean": mean(xs),
        "median": percentile(xs, 50),
        "p10": percentile(xs, 10),
        "p90": percentile(xs, 90),
        "min": min(xs) if xs else None,
        "max": max(xs) if xs else None,
        "histogram": {"edges": edges, "counts": histogram(xs, edges)},
    }
