"""Best-of-K pairs (``sampling.pairing=best_worst``): rank each prompt's K responses, train on (best, worst).

As DNO, iterative RPO and self-rewarding language models do, every prompt contributes one
training pair: its best response against its worst. The ranking comes from the judge:

* **Schedule**: every pair of the K responses is judged (K(K-1)/2 comparisons, the ``all``
  schedule of :func:`oaif.step.pairs.candidate_pairs`). At the K this is meant for (3 to 8) that is
  3 to 28 comparisons; a cheaper schedule (a tournament, K-1 comparisons against one anchor) would
  rank from one noisy judgment per response, and a single failure would leave a response unranked.
* **Score**: each response's mean win probability, the mean over its successful comparisons of
  the judge's probability that it is the better one (after ``loss.missing_eos_penalty``). With every
  pair judged this is the Borda score, which orders responses as their Bradley-Terry strengths do
  when the judge follows a Bradley-Terry model, and it needs no fit (a Bradley-Terry fit diverges
  when a rule judge says 0 or 1). Identical responses (not judged against each other) get equal
  scores. Ties in score go to the lower sample index.
* **Label**: P(best better than worst) = (1 + s_best - s_worst) / 2, in (0.5, 1]; with K=2 this is
  the judge's own probability. ``loss.soft_labels`` trains on it, otherwise the label is 1; a label
  within ``loss.min_confidence`` of 0.5 is masked as ``tie``.

Failed judgments mask only the comparisons they touch (they are counted as failed, by reason, as
in every pairing): a response with no successful comparison is left out of the ranking. A prompt
whose ranking is undetermined is masked and counted by reason: ``undetermined_failed`` (fewer than
two responses have a successful comparison, because judgments failed) or ``undetermined_tie``
(the best and worst scores are equal: every comparison tied, or every response identical).
"""

from __future__ import annotations

from oaif.annotators.base import Judgment
from oaif.step.pairs import penalize_unfinished
from oaif.step.records import PairPlan, PreferenceBatch, Rollouts

#: Why a prompt's (best, worst) pair is masked under best_worst (``masked/<reason>`` in metrics).
UNDETERMINED = ("undetermined_failed", "undetermined_tie")
#: Score differences below this are ties (the same judgments summed in another order differ by rounding).
SCORE_TOLERANCE = 1e-9


def mean_win_scores(k: int, comparisons: list[tuple[int, int, float]]) -> list[float | None]:
    """Each response's mean win probability over the comparisons ``(i, j, P(i better than j))`` it
    takes part in; None for a response in none of them."""
    wins, counts = [0.0] * k, [0] * k
    for i, j, p in comparisons:
        wins[i] += p
        wins[j] += 1.0 - p
        counts[i] += 1
        counts[j] += 1
    return [w / n if n else None for w, n in zip(wins, counts)]


def best_and_worst(scores: list[float | None]) -> tuple[int, int] | None:
    """The best and the worst scored response (ties to the lower index); None when fewer than two are
    scored or the best scores no higher than the worst (within :data:`SCORE_TOLERANCE`)."""
    scored = [i for i, s in enumerate(scores) if s is not None]
    if len(scored) < 2:
        return None
    best = max(scored, key=lambda i: (scores[i], -i))
    worst = min(scored, key=lambda i: (scores[i], i))
    return (best, worst) if scores[best] - scores[worst] > SCORE_TOLERANCE else None


def prompt_comparisons(rollouts: Rollouts, plan: PairPlan, judgments: list[Judgment], missing_eos_penalty: float,
                       batch: PreferenceBatch) -> tuple[list[list[tuple[int, int, float]]], list[int]]:
    """Per prompt, its successful comparisons ``(ka, kb, P(ka better))`` with the penalty applied, and
    how many of its comparisons failed; failures are counted into ``batch.failed`` by reason."""
    comparisons: list[list[tuple[int, int, float]]] = [[] for _ in range(rollouts.num_prompts)]
    failures = [0] * rollouts.num_prompts
    for (b, ka, kb), j in zip(plan.pairs, judgments):
        if not j.ok:
            batch.failed[j.failure_reason] += 1
            failures[b] += 1
            continue
        ended = rollouts.ended_eos[b]
        comparisons[b].append((ka, kb, penalize_unfinished(j.prob, ended[ka], ended[kb], missing_eos_penalty)))
    return comparisons, failures


def build_best_worst(rollouts: Rollouts, plan: PairPlan, judgments: list[Judgment], *, soft_labels: bool = False,
                     min_confidence: float = 0.0, missing_eos_penalty: float = 0.0) -> PreferenceBatch:
    """One (best, worst) pair per prompt whose ranking the judged comparisons determine; see the module doc.
    ``comparisons`` of the batch holds, per pair, the successful comparisons its ranking rests on."""
    if len(judgments) != len(plan.pairs):
        raise ValueError(f"annotator returned {len(judgments)} judgments for {len(plan.pairs)} pairs")
    batch = PreferenceBatch(chosen=[], rejected=[], label_probs=[])
    if plan.identical:
        batch.masked["identical"] += plan.identical
    comparisons, failures = prompt_comparisons(rollouts, plan, judgments, missing_eos_penalty, batch)
    for b in range(rollouts.num_prompts):
        scores = mean_win_scores(rollouts.k, comparisons[b])
        picked = best_and_worst(scores)
        if picked is None:
            few = sum(s is not None for s in scores) < 2
            batch.masked["undetermined_failed" if few and failures[b] else "undetermined_tie"] += 1
            continue
        best, worst = picked
        p = (1.0 + scores[best] - scores[worst]) / 2
        if p - 0.5 < min_confidence:
            batch.masked["tie"] += 1
            continue
        batch.chosen.append(rollouts.flat(b, best))
        batch.rejected.append(rollouts.flat(b, worst))
        batch.label_probs.append(p if soft_labels else 1.0)
        batch.comparisons.append(len(comparisons[b]))
    return batch
