"""Steps 2 and 3 of the loop: ask the annotator about response pairs, then build training pairs.

``pair_requests`` turns rollouts into :class:`PairRequest` s, leaving out pairs whose two
responses are identical (nothing to learn, nothing to pay a judge for): the same tokens, or the
same text, which is what a judge reads (another split of a word, a stripped trailing space; a judge
can only answer such a pair with 0.5 plus noise, which a hard label would turn into a preference). ``build_pairs`` turns
judgments into a :class:`PreferenceBatch`: which response is chosen, which rejected, with what
label probability. Identical pairs, ties and failed judgments are masked and counted by reason;
they never enter the loss.

``missing_eos_penalty`` (``loss.missing_eos_penalty``) follows TRL's OnlineDPO: a response that
did not end (no end-of-turn token within ``sampling.max_new_tokens``) has the penalty subtracted
from its score. For a pairwise judge the score is the Bradley-Terry one, P(a better) =
sigmoid(s_a - s_b), so when exactly one response of a pair did not end, the judge's probability
that it is better becomes ``sigmoid(logit(p) - penalty)``; ``inf`` makes it lose whatever the
judge said. The judge is still asked (its raw answer is what the audit log records), and a
failed judgment stays masked.

Offline mode builds the same records from a preference file (:func:`preference_rollouts`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

from oaif.annotators.base import Judgment, PairRequest
from oaif.errors import AnnotatorError
from oaif.step.records import PairPlan, PreferenceBatch, Rollouts


def candidate_pairs(k: int, pairing: str) -> list[tuple[int, int]]:
    """Which of the K responses of a prompt are compared: disjoint neighbours or every pair (``all``, and
    ``best_worst``, which ranks the responses from every pair: :mod:`oaif.step.ranking`)."""
    if pairing == "disjoint":
        return [(j, j + 1) for j in range(0, k - 1, 2)]
    if pairing in ("all", "best_worst"):
        return list(itertools.combinations(range(k), 2))
    raise ValueError(f"unknown pairing {pairing!r}")


def pair_requests(rollouts: Rollouts, pairing: str = "disjoint") -> PairPlan:
    plan = PairPlan(pairs=[], requests=[])
    for b in range(rollouts.num_prompts):
        for ka, kb in candidate_pairs(rollouts.k, pairing):
            if rollouts.responses[b][ka] == rollouts.responses[b][kb] or rollouts.texts[b][ka] == rollouts.texts[b][kb]:
                plan.identical += 1
                continue
            plan.pairs.append((b, ka, kb))
            plan.requests.append(PairRequest(prompt=rollouts.prompt_texts[b], a=rollouts.texts[b][ka],
                                             b=rollouts.texts[b][kb], prompt_id=rollouts.prompt_ids[b]))
    return plan


def annotate_pairs(annotator, rollouts: Rollouts, pairing: str) -> tuple[PairPlan, list[Judgment]]:
    """Step 2: the plan of pairs to judge and the annotator's judgment of each (none asked when all are identical)."""
    plan = pair_requests(rollouts, pairing)
    judgments = annotator.annotate(plan.requests) if plan.requests else []
    if len(judgments) != len(plan.requests):
        raise AnnotatorError(f"annotator {getattr(annotator, 'name', '?')} returned {len(judgments)} "
                             f"judgments for {len(plan.requests)} pairs")
    return plan, judgments


def penalize_unfinished(p: float, a_ended: bool, b_ended: bool, penalty: float) -> float:
    """P(a better) after subtracting ``penalty`` from the Bradley-Terry score of the one response of
    the pair that did not end (unchanged when both or neither ended, or ``penalty == 0``)."""
    if a_ended == b_ended or penalty == 0:
        return p
    q = p if not a_ended else 1.0 - p  # P(the unfinished response is better)
    w = math.exp(-penalty)  # in [0, 1]: the penalty as an odds factor
    q = q * w / (q * w + (1.0 - q)) if q * w + (1.0 - q) > 0 else 0.0  # q = 1 and an infinite penalty: it loses
    return q if not a_ended else 1.0 - q


def build_pairs(rollouts: Rollouts, plan: PairPlan, judgments: list[Judgment], *, soft_labels: bool = False,
                min_confidence: float = 0.0, missing_eos_penalty: float = 0.0) -> PreferenceBatch:
    """Orient each judged pair by the annotator's preference; mask ties and failures."""
    if len(judgments) != len(plan.pairs):
        raise ValueError(f"annotator returned {len(judgments)} judgments for {len(plan.pairs)} pairs")
    batch = PreferenceBatch(chosen=[], rejected=[], label_probs=[])
    if plan.identical:
        batch.masked["identical"] += plan.identical
    for (b, ka, kb), j in zip(plan.pairs, judgments):
        if not j.ok:
            batch.failed[j.failure_reason] += 1
            continue
        ended = rollouts.ended_eos[b]
        p = penalize_unfinished(j.prob, ended[ka], ended[kb], missing_eos_penalty)
        if p == 0.5 or abs(p - 0.5) < min_confidence:
            batch.masked["tie"] += 1
            continue
        a, c = rollouts.flat(b, ka), rollouts.flat(b, kb)
        chosen, rejected, p_chosen = (a, c, p) if p > 0.5 else (c, a, 1.0 - p)
        batch.chosen.append(chosen)
        batch.rejected.append(rejected)
        batch.label_probs.append(p_chosen if soft_labels else 1.0)
    return batch


@dataclass
class FilePairs:
    """Offline mode's stand-in for sampling and annotation: a preference file's pairs as K=2 rollouts
    (chosen first) and the file's labels as the plan's probabilities."""

    rollouts: Rollouts
    plan: PairPlan
    labels: list[Judgment]  # P(chosen better) from the file (1.0 without a probability); not a judge's
    truncated: int  # responses cut to the token limit


def preference_rollouts(batch: list, prompt_tokens: dict[str, list[int]], tokenize: Callable[[str], list[int]],
                        end_of_turn: int, max_tokens: int) -> FilePairs:
    """Tokenize ``(position, PreferenceRecord)`` pairs exactly as sampling would have produced them.

    A response is its text's tokens followed by ``end_of_turn`` (the token sampling stops on), cut
    to ``max_tokens`` tokens (``sampling.max_new_tokens``; a cut response did not end, as a sampled
    one that hit the limit). Pairs identical after the cut are masked like sampled ones.
    """
    records = [rec for _, rec in batch]
    responses, ended, truncated = [], [], 0
    for rec in records:
        pair = [tokenize(text) + [end_of_turn] for text in (rec.chosen, rec.rejected)]
        truncated += sum(len(r) > max_tokens for r in pair)
        responses.append([r[:max_tokens] for r in pair])
        ended.append([len(r) <= max_tokens for r in pair])
    rollouts = Rollouts(positions=[pos for pos, _ in batch], prompt_ids=[r.id for r in records],
                        prompt_texts=[r.text for r in records], prompt_tokens=[prompt_tokens[r.id] for r in records],
                        responses=responses, texts=[[r.chosen, r.rejected] for r in records], ended_eos=ended)
    plan = pair_requests(rollouts, "disjoint")
    labels = [Judgment(prob=1.0 if records[b].prob is None else float(records[b].prob), judge="preference_file")
              for b, _, _ in plan.pairs]
    return FilePairs(rollouts, plan, labels, truncated)
