"""Ensemble judge: several annotators judge the same pairs; their verdicts are combined.

Every member's ``annotate`` is called on the same requests. Per pair, only the members that
succeeded count:

* ``mode="mean"``: the ensemble's probability is the mean of their probabilities;
* ``mode="majority"``: it is the fraction of them that prefer ``a`` (prob > 0.5), a member at
  exactly 0.5 counting half.

``prob_ab`` / ``prob_ba`` are the means over the succeeded members that report them. When every
member fails, the pair fails as ``"all_failed"``, never becoming a label. ``extra["members"]``
maps each member's name to its probability or its failure reason.

The ensemble keeps running counts (since creation) of how often each member's winner agrees with
the ensemble's winner (:meth:`EnsembleJudge.agreement`). The trainer counts the same from the
judgments it trains on (:class:`AgreementTally`, logged as ``judge_agreement/<member>``), so that
batches judged ahead (``train.async_steps``) count at the step that uses them. A winner is ``a`` (prob > 0.5), ``b`` (< 0.5) or a tie (exactly
0.5); a tie against a decisive winner counts as half an agreement.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Sequence

from oaif.annotators.base import Judgment, PairRequest
from oaif.errors import AnnotatorError, OaifError
from oaif.stats import mean, score

log = logging.getLogger("oaif.annotators")

MODES = ("mean", "majority")


def _winner(p: float) -> int:
    return 1 if p > 0.5 else (-1 if p < 0.5 else 0)


def _agreement(u: int, v: int) -> float:
    if u == v:
        return 1.0
    return 0.5 if (u == 0 or v == 0) else 0.0


class AgreementTally:
    """Running counts, per member, of how often its winner is the ensemble's, read from ensemble judgments
    (``extra["members"]``: a member's probability, or its failure reason, which does not count)."""

    def __init__(self):
        self._agree: dict[str, float] = {}
        self._counted: dict[str, int] = {}

    def add(self, judgments: Sequence[Judgment]) -> None:
        for j in judgments:
            members = j.extra.get("members") if j.ok else None
            if not members:
                continue
            ensemble_winner = _winner(float(j.prob))
            for n, p in members.items():
                if isinstance(p, (int, float)):
                    self._agree[n] = self._agree.get(n, 0.0) + _agreement(_winner(float(p)), ensemble_winner)
                    self._counted[n] = self._counted.get(n, 0) + 1

    def values(self) -> dict[str, float]:
        """Per member that judged at least one counted pair: the fraction of agreements."""
        return {n: self._agree[n] / c for n, c in self._counted.items()}


class EnsembleJudge:
    """Combine the judgments of several annotators (mean of probabilities or majority vote)."""

    def __init__(self, judges: Sequence, *, mode: str = "mean", name: str | None = None):
        judges = list(judges)
        if not judges:
            raise AnnotatorError("an ensemble judge needs at least one member")
        if mode not in MODES:
            raise AnnotatorError(f"ensemble mode must be one of {', '.join(MODES)}, got {mode!r}")
        for j in judges:
            if not callable(getattr(j, "annotate", None)):
                raise AnnotatorError(f"ensemble member {j!r} has no annotate(requests) method")
        self.judges = judges
        self.mode = mode
        # Member names key the diagnostics, so they must be unique: repeated names get '#2', '#3', ...
        names: list[str] = []
        seen: Counter = Counter()
        for j in judges:
            base = str(getattr(j, "name", "") or type(j).__name__)
            seen[base] += 1
            names.append(base if seen[base] == 1 else f"{base}#{seen[base]}")
        self.member_names = names
        self.name = name or f"ensemble:{mode}:" + "+".join(names)
        self._tally = AgreementTally()

    def agreement(self) -> dict[str, float]:
        """Per member: the fraction of pairs (both it and the ensemble judged) where its winner is the ensemble's.

        Members that have not judged a pair the ensemble also judged are left out.
        """
        return self._tally.values()

    def _member_judgments(self, judge, member: str, requests: Sequence[PairRequest]) -> list[Judgment]:
        try:
            out = list(judge.annotate(requests))
        except OaifError:
            raise  # misconfiguration is the user's to fix, not a masked pair
        except Exception as e:  # a member's fault masks its votes, never the whole batch
            log.warning("ensemble member %s raised %s: %s (its judgments are masked)", member, type(e).__name__, e)
            return [Judgment.failed("member_error", member, error=f"{type(e).__name__}: {e}") for _ in requests]
        if len(out) != len(requests):
            log.warning("ensemble member %s returned %d judgments for %d requests (its judgments are masked)",
                        member, len(out), len(requests))
            return [Judgment.failed("member_error", member, error="wrong number of judgments") for _ in requests]
        return out

    def annotate(self, requests: Sequence[PairRequest]) -> list[Judgment]:
        if not requests:
            return []
        t0 = time.perf_counter()
        per_member = [self._member_judgments(j, n, requests) for j, n in zip(self.judges, self.member_names)]
        latency = (time.perf_counter() - t0) / len(requests)
        out = []
        for i in range(len(requests)):
            members: dict[str, float | str] = {}
            ok: list[tuple[str, Judgment]] = []
            for n, js in zip(self.member_names, per_member):
                j = js[i]
                if j.ok:
                    members[n] = float(j.prob)
                    ok.append((n, j))
                else:
                    members[n] = j.failure or "nan"
            if not ok:
                out.append(Judgment.failed("all_failed", self.name, latency, members=members, n_ok=0))
                continue
            probs = [float(j.prob) for _, j in ok]
            prob = mean(probs) if self.mode == "mean" else mean([score(p) for p in probs])
            prob_ab = mean([j.prob_ab for _, j in ok if j.prob_ab is not None])
            prob_ba = mean([j.prob_ba for _, j in ok if j.prob_ba is not None])
            out.append(Judgment(prob=prob, prob_ab=prob_ab, prob_ba=prob_ba, latency_s=latency, judge=self.name,
                                extra={"members": members, "n_ok": len(ok)}))
        self._tally.add(out)
        return out
