"""Whether the judge's labels are better than coin flips: a warning during a run, numbers at its end.

Two numbers of the judged pairs tell a label from a coin flip. The **both-order consistency**
(``judge_consistency``) is the share of pairs whose two orders pick the same response: a judge
that picks at random agrees with itself on half of them, one that picks by position on none. The
**distance** is the mean of |P - 0.5| (``judge_confidence`` - 0.5): a judge whose two orders
cancel leaves every preference near 0.5. The labels are called noise when both fall short
(:func:`is_noise`): consistency under :data:`MIN_CONSISTENCY` and distance under
:data:`MIN_DISTANCE`. Measured (DEVELOPERS.md, "The judge noise check"): the demo's embedded
SmolLM2 judge sits far below both (consistency about 0.1, distance about 0.01); the rule judge
``prefer_shorter`` far above (1 and about 0.4).

A judge without a consistency of its own is never called noise: a pointwise judge (a rule or a
reward model scores each response alone) is consistent by construction (1), and a judge read in
one order (``annotator.both_orders=false``) reports none. The distance alone cannot tell noise
from a steady but timid scorer: a reward model whose preferences all stayed within 0.003 of 0.5
still moved the policy to its own preference (docs/RESULTS.md, "RM vs LLM feedback").

:class:`NoiseWindow` measures the last ``annotator.noise_window`` judged pairs from the step's
summed metrics (every process's pairs: the same numbers on every process), and says so once.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

#: Labels are noise when the orders agree on fewer pairs than two coin flips would (0.5) ...
MIN_CONSISTENCY = 0.5
#: ... and the mean preference stays within this distance of 0.5.
MIN_DISTANCE = 0.1
#: What to do about it, for the warning and the summary.
ADVICE = ("use a stronger judge (docs/judges.md, \"Which judge runs here?\") or a rule or reward model "
          "(annotator.type=callable or reward_model)")


def is_noise(consistency: float | None, distance: float | None) -> bool:
    """Whether labels with this both-order consistency and mean |P - 0.5| are no better than coin flips."""
    if consistency is None or distance is None:
        return False
    return consistency < MIN_CONSISTENCY and distance < MIN_DISTANCE


@dataclass
class JudgeNumbers:
    """Sums over some judged pairs: consistency (pairs read in both orders) and max(p, 1 - p) (every pair judged)."""

    consistent: float = 0.0
    both_orders: float = 0.0
    confidence: float = 0.0
    judged: float = 0.0

    @classmethod
    def of(cls, step) -> "JudgeNumbers":
        """The judge's sums of a :class:`oaif.run.metrics.StepMetrics` (reduced: every process's pairs)."""
        (c, nc), (p, n) = step.sums["judge_consistency"], step.sums["judge_confidence"]
        return cls(c, nc, p, n)

    def __add__(self, o: "JudgeNumbers") -> "JudgeNumbers":
        return JudgeNumbers(self.consistent + o.consistent, self.both_orders + o.both_orders,
                            self.confidence + o.confidence, self.judged + o.judged)

    def __sub__(self, o: "JudgeNumbers") -> "JudgeNumbers":
        return self + JudgeNumbers(-o.consistent, -o.both_orders, -o.confidence, -o.judged)

    @property
    def consistency(self) -> float | None:
        return self.consistent / self.both_orders if self.both_orders else None

    @property
    def distance(self) -> float | None:
        return self.confidence / self.judged - 0.5 if self.judged else None

    @property
    def noise(self) -> bool:
        return is_noise(self.consistency, self.distance)

    def describe(self) -> str:
        """The numbers in words, with the thresholds: '... over N judged pairs'."""
        n = int(round(self.judged))
        if self.consistency is None:
            cons = "both-order consistency not measured (annotator.both_orders=false: not checked)"
        else:
            cons = f"both-order consistency {self.consistency:.3f} (noise under {MIN_CONSISTENCY})"
        return f"{cons}, mean |P - 0.5| {self.distance:.3f} (noise under {MIN_DISTANCE}) over {n} judged pairs"


def describe_metrics(records: list[dict]) -> tuple[str, bool] | None:
    """The judge's numbers over a run's ``metrics.jsonl`` records and whether they are noise; None when
    no record has a judged pair (offline runs). Means per step are weighted by the step's judged pairs."""
    total = JudgeNumbers()
    for r in records:
        n = float(r.get("pairs_judged", 0) - r.get("pairs_failed", 0))  # the judgments that succeeded
        if "judge_confidence" not in r or n <= 0:
            continue
        cons = r.get("judge_consistency")
        total += JudgeNumbers(cons * n if cons is not None else 0.0, n if cons is not None else 0.0,
                              r["judge_confidence"] * n, n)
    return (total.describe(), total.noise) if total.judged else None


class NoiseWindow:
    """The judge's numbers over the most recent ``size`` judged pairs (whole steps), and over the run.

    ``size`` 0 turns the warning off (the run's numbers are still kept for the summary). Like the
    failure window it holds only this process's steps: a resumed run is judged afresh.
    """

    def __init__(self, size: int):
        self.size = size
        self.steps: deque[JudgeNumbers] = deque()
        self.window = JudgeNumbers()
        self.run = JudgeNumbers()
        self.warned = False

    def add(self, step) -> None:
        """One step's summed metrics (:class:`oaif.run.metrics.StepMetrics`, reduced over processes)."""
        numbers = JudgeNumbers.of(step)
        self.run += numbers
        self.steps.append(numbers)
        self.window += numbers
        while len(self.steps) > 1 and self.window.judged - self.steps[0].judged >= self.size:
            self.window -= self.steps.popleft()

    def warning(self) -> str | None:
        """The warning, once: when a full window's labels are no better than coin flips; else None."""
        if self.warned or not self.size or self.window.judged < self.size or not self.window.noise:
            return None
        self.warned = True
        return (f"the judge's labels look no better than coin flips: {self.window.describe()} "
                f"(annotator.noise_window={self.size}); {ADVICE}")

    def summary(self) -> str | None:
        """The run's judge numbers and verdict, for the final summary; None when nothing was judged."""
        if not self.run.judged:
            return None
        verdict = f"no better than coin flips; {ADVICE}" if self.run.noise else "better than coin flips"
        return f"{self.run.describe()}: {verdict}"
