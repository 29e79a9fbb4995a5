"""Steps 2 and 3 of the loop: ask the annotator about response pairs, then build training pairs.

``pair_requests`` turns rollouts into :class:`PairRequest` s, leaving out pairs whose two
responses are identical (nothing to learn, nothing to pay a judge for). ``build_pairs`` turns
judgments into a :class:`PreferenceBatch`: which response is chosen, which rejected, with what
label probability. Identical pairs, ties and failed judgments are masked and counted by reason;
they never enter the loss.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field

from oaif.annotators.base import Judgment, PairRequest
from oaif.sampling import Rollouts


def candidate_pairs(k: int, pairing: str) -> list[tuple[int, int]]:
    """Which of the K responses of a prompt are compared: disjoint neighbours or every pair."""
    if pairing == "disjoint":
        return [(j, j + 1) for j in range(0, k - 1, 2)]
    if pairing == "all":
        return list(itertools.combinations(range(k), 2))
    raise ValueError(f"unknown pairing {pairing!r}")


@dataclass
class PairPlan:
    """The pairs to judge, as (prompt row, k_a, k_b), and those masked before judging."""

    pairs: list[tuple[int, int, int]]
    requests: list[PairRequest]
    identical: int = 0


def pair_requests(rollouts: Rollouts, pairing: str = "disjoint") -> PairPlan:
    plan = PairPlan(pairs=[], requests=[])
    for b in range(rollouts.num_prompts):
        for ka, kb in candidate_pairs(rollouts.k, pairing):
            if rollouts.responses[b][ka] == rollouts.responses[b][kb]:
                plan.identical += 1
                continue
            plan.pairs.append((b, ka, kb))
            plan.requests.append(PairRequest(prompt=rollouts.prompt_texts[b], a=rollouts.texts[b][ka],
                                             b=rollouts.texts[b][kb], prompt_id=rollouts.prompt_ids[b]))
    return plan


@dataclass
class PreferenceBatch:
    """Training pairs as flat response indices into the rollouts (row-major b * K + k)."""

    chosen: list[int]
    rejected: list[int]
    label_probs: list[float]  # P(chosen better): 1.0 with hard labels
    judged_probs: list[float]  # the annotator's P(chosen better), for logging
    masked: Counter = field(default_factory=Counter)  # reason -> count (identical, tie)
    failed: Counter = field(default_factory=Counter)  # failure reason -> count

    @property
    def size(self) -> int:
        return len(self.chosen)

    def responses_used(self) -> list[int]:
        """Flat indices of every response that appears in a pair, each once, in order."""
        return sorted(set(self.chosen) | set(self.rejected))


def build_pairs(rollouts: Rollouts, plan: PairPlan, judgments: list[Judgment], *, soft_labels: bool = False,
                min_confidence: float = 0.0) -> PreferenceBatch:
    """Orient each judged pair by the annotator's preference; mask ties and failures."""
    if len(judgments) != len(plan.pairs):
        raise ValueError(f"annotator returned {len(judgments)} judgments for {len(plan.pairs)} pairs")
    batch = PreferenceBatch(chosen=[], rejected=[], label_probs=[], judged_probs=[])
    if plan.identical:
        batch.masked["identical"] += plan.identical
    for (b, ka, kb), j in zip(plan.pairs, judgments):
        if not j.ok:
            batch.failed[j.failure or "no_probability"] += 1
            continue
        p = j.prob
        if p == 0.5 or abs(p - 0.5) < min_confidence:
            batch.masked["tie"] += 1
            continue
        a, c = rollouts.flat(b, ka), rollouts.flat(b, kb)
        chosen, rejected, p_chosen = (a, c, p) if p > 0.5 else (c, a, 1.0 - p)
        batch.chosen.append(chosen)
        batch.rejected.append(rejected)
        batch.judged_probs.append(p_chosen)
        batch.label_probs.append(p_chosen if soft_labels else 1.0)
    return batch
