"""Building training pairs from judgments: orientation, masking, TRL's missing-EOS penalty."""

from __future__ import annotations

import math

import pytest

from oaif.annotators.base import Judgment
from oaif.step.pairs import build_pairs, pair_requests, penalize_unfinished
from oaif.step.ranking import best_and_worst, build_best_worst, mean_win_scores
from oaif.step.records import Rollouts


def rollouts(ended: list[list[bool]]) -> Rollouts:
    """Two prompts x two distinct responses each, with the given EOS flags."""
    n = len(ended)
    return Rollouts(positions=list(range(n)), prompt_ids=[f"p{i}" for i in range(n)], prompt_texts=["q"] * n,
                    prompt_tokens=[[1, 2]] * n, responses=[[[10 + i], [20 + i, 21]] for i in range(n)],
                    texts=[[f"a{i}", f"b{i}"] for i in range(n)], ended_eos=ended)


def test_penalty_shifts_the_logit_of_the_unfinished_response():
    logit = math.log(0.8 / 0.2)
    # a did not end: P(a better) = sigmoid(logit(p) - penalty)
    assert penalize_unfinished(0.8, False, True, 1.0) == pytest.approx(1 / (1 + math.exp(-(logit - 1.0))))
    # b did not end: P(b better) = sigmoid(logit(1 - p) - penalty)
    assert penalize_unfinished(0.8, True, False, 1.0) == pytest.approx(1 - 1 / (1 + math.exp(-(-logit - 1.0))))
    for a_ended, b_ended in ((True, True), (False, False)):
        assert penalize_unfinished(0.8, a_ended, b_ended, 5.0) == 0.8
    assert penalize_unfinished(0.8, False, True, 0.0) == 0.8
    # an infinite penalty: the unfinished response loses, even against a certain judge
    assert penalize_unfinished(1.0, False, True, math.inf) == 0.0
    assert penalize_unfinished(0.0, True, False, math.inf) == 1.0
    assert penalize_unfinished(0.3, False, True, 1e6) == 0.0


def test_build_pairs_with_the_penalty():
    roll = rollouts([[False, True], [True, True]])
    plan = pair_requests(roll)
    judged = [Judgment(prob=0.9), Judgment(prob=0.9)]
    plain = build_pairs(roll, plan, judged)
    assert (plain.chosen, plain.rejected) == ([0, 2], [1, 3])
    # with an infinite penalty the unfinished a of prompt 0 loses; prompt 1 (both ended) is unchanged
    penal = build_pairs(roll, plan, judged, missing_eos_penalty=math.inf, soft_labels=True)
    assert (penal.chosen, penal.rejected, penal.label_probs) == ([1, 2], [0, 3], [1.0, 0.9])
    # a finite penalty that brings the judge's 0.9 (logit 2.197) to exactly a tie masks the pair
    tie = build_pairs(roll, plan, [Judgment(prob=0.9), Judgment(prob=0.5)], missing_eos_penalty=math.log(9))
    assert tie.size == 0 and tie.masked["tie"] == 2
    # a failed judgment stays masked as failed, whatever the penalty
    failed = build_pairs(roll, plan, [Judgment.failed("timeout"), Judgment(prob=0.9)], missing_eos_penalty=math.inf)
    assert failed.failed == {"timeout": 1} and failed.size == 1


def test_responses_that_read_the_same_are_identical_not_judged(tiny_model_dir):
    """Other tokens, the same text (another split of a word, a trailing space that decoding strips): the
    judge would read two identical responses and answer 0.5 +- noise, which a hard label turns into a
    preference. They are masked as identical, like equal token lists."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok.convert_tokens_to_ids
    hello, split = tok.encode("Hello there", add_special_tokens=False), [ids("H"), ids("ello"), *tok.encode(" there")]
    assert hello != split
    responses = [[hello, split], [hello + [ids("Ġ")], hello], [hello, tok.encode("Hello here")]]
    texts = [[tok.decode(r, skip_special_tokens=True).strip() for r in rs] for rs in responses]  # as sample_rollouts
    roll = Rollouts(positions=[0, 1, 2], prompt_ids=["p0", "p1", "p2"], prompt_texts=["q"] * 3, prompt_tokens=[[1]] * 3,
                    responses=responses, texts=texts, ended_eos=[[True, True]] * 3)
    plan = pair_requests(roll)
    assert plan.identical == 2 and plan.pairs == [(2, 0, 1)]
    assert [(r.a, r.b) for r in plan.requests] == [("Hello there", "Hello here")]
    assert build_pairs(roll, plan, [Judgment(prob=0.9)]).masked["identical"] == 2


def test_a_judgment_without_probability_or_reason_counts_as_no_prob_in_training_as_in_eval():
    from oaif.annotators.base import failure_counts

    roll = rollouts([[True, True], [True, True]])
    judged = [Judgment(prob=None), Judgment.failed("timeout")]
    assert build_pairs(roll, pair_requests(roll), judged).failed == failure_counts(judged) == {"no_prob": 1, "timeout": 1}


# -- best-of-K pairs (sampling.pairing=best_worst) ------------------------------------------------
def k_rollouts(texts: list[list[str]], ended: list[list[bool]] | None = None) -> Rollouts:
    """One prompt per row of ``texts``; the responses' tokens are their characters' codes (equal texts, equal tokens)."""
    n = len(texts)
    return Rollouts(positions=list(range(n)), prompt_ids=[f"p{i}" for i in range(n)], prompt_texts=["q"] * n,
                    prompt_tokens=[[1, 2]] * n, responses=[[[ord(c) for c in t] for t in row] for row in texts],
                    texts=texts, ended_eos=ended or [[True] * len(row) for row in texts])


def judged(plan, probs: dict) -> list[Judgment]:
    """A judgment per planned pair: ``probs[(b, ka, kb)]`` is P(ka better), or a failure reason (a str)."""
    out = []
    for pair in plan.pairs:
        p = probs[pair]
        out.append(Judgment.failed(p) if isinstance(p, str) else Judgment(prob=p))
    return out


def test_best_worst_judges_every_pair_and_scores_by_mean_win_probability():
    roll = k_rollouts([["x", "yy", "zzz"]])
    plan = pair_requests(roll, "best_worst")
    assert plan.pairs == [(0, 0, 1), (0, 0, 2), (0, 1, 2)]  # K(K-1)/2 comparisons
    probs = {(0, 0, 1): 0.9, (0, 0, 2): 0.6, (0, 1, 2): 0.3}
    # s0 = (0.9 + 0.6) / 2 = 0.75, s1 = (0.1 + 0.3) / 2 = 0.2, s2 = (0.4 + 0.7) / 2 = 0.55
    assert mean_win_scores(3, [(a, b, probs[(0, a, b)]) for _, a, b in plan.pairs]) == pytest.approx([0.75, 0.2, 0.55])
    hard = build_best_worst(roll, plan, judged(plan, probs))
    assert (hard.chosen, hard.rejected, hard.label_probs, hard.comparisons) == ([0], [1], [1.0], [3])
    soft = build_best_worst(roll, plan, judged(plan, probs), soft_labels=True)
    assert soft.label_probs == pytest.approx([(1 + 0.75 - 0.2) / 2])  # 0.775
    # a label within loss.min_confidence of 0.5 is a tie: 0.775 - 0.5 = 0.275
    assert build_best_worst(roll, plan, judged(plan, probs), min_confidence=0.28).masked == {"tie": 1}
    assert build_best_worst(roll, plan, judged(plan, probs), min_confidence=0.27).size == 1


def test_best_worst_flat_indices_and_the_judge_order_of_a_pair():
    # prompt 1: 2 beats everyone, 0 loses to everyone; flat indices are b * K + k
    roll = k_rollouts([["a", "bb", "ccc"], ["d", "ee", "fff"]])
    plan = pair_requests(roll, "best_worst")
    probs = {(0, 0, 1): 1.0, (0, 0, 2): 1.0, (0, 1, 2): 1.0, (1, 0, 1): 0.2, (1, 0, 2): 0.1, (1, 1, 2): 0.3}
    batch = build_best_worst(roll, plan, judged(plan, probs), soft_labels=True)
    # prompt 1: s0 = (0.2 + 0.1) / 2 = 0.15, s1 = (0.8 + 0.3) / 2 = 0.55, s2 = (0.9 + 0.7) / 2 = 0.8
    assert (batch.chosen, batch.rejected) == ([0, 5], [2, 3])
    assert batch.label_probs == pytest.approx([1.0, (1 + 0.8 - 0.15) / 2])


def test_failures_mask_only_the_comparisons_they_touch():
    roll = k_rollouts([["a", "bb", "ccc", "dddd"]])
    plan = pair_requests(roll, "best_worst")
    assert len(plan.pairs) == 6
    # 3 is best against 0 and 1, but its comparison with 2 failed; 0 beats 1 and 2
    probs = {(0, 0, 1): 0.8, (0, 0, 2): 0.7, (0, 0, 3): 0.4, (0, 1, 2): 0.5, (0, 1, 3): 0.1, (0, 2, 3): "timeout"}
    batch = build_best_worst(roll, plan, judged(plan, probs), soft_labels=True)
    # s0 = (0.8 + 0.7 + 0.4) / 3, s1 = (0.2 + 0.5 + 0.1) / 3, s2 = (0.3 + 0.5) / 2 = 0.4, s3 = (0.6 + 0.9) / 2 = 0.75
    assert (batch.chosen, batch.rejected, batch.comparisons) == ([3], [1], [5])
    assert batch.label_probs == pytest.approx([(1 + 0.75 - 0.8 / 3) / 2])
    assert batch.failed == {"timeout": 1} and not batch.masked
    # a response whose every comparison failed is left out of the ranking; the others are still ranked
    probs = {(0, 0, 1): 0.8, (0, 0, 2): 0.7, (0, 0, 3): "nan", (0, 1, 2): 0.5, (0, 1, 3): "nan", (0, 2, 3): "nan"}
    batch = build_best_worst(roll, plan, judged(plan, probs))
    # s0 = 0.75, s1 = (0.2 + 0.5) / 2 = 0.35, s2 = (0.3 + 0.5) / 2 = 0.4
    assert (batch.chosen, batch.rejected, batch.failed) == ([0], [1], {"nan": 3})


def test_undetermined_rankings_are_masked_and_counted_by_reason():
    texts = [["a", "bb", "ccc"]] * 5 + [["same", "same", "same"]]
    roll = k_rollouts(texts)
    plan = pair_requests(roll, "best_worst")
    assert plan.identical == 3  # prompt 5's three identical responses are never judged
    probs = {}
    for b, ka, kb in plan.pairs:
        probs[(b, ka, kb)] = {0: 0.5,  # every comparison a tie
                              1: 1.0 if (ka, kb) != (0, 2) else 0.0,  # a cycle: 0 > 1 > 2 > 0, all score 0.5
                              2: "timeout",  # every comparison failed
                              3: 0.9 if (ka, kb) == (0, 1) else "http_error",  # 2 unranked, 0 over 1: a pair
                              4: 0.9 if (ka, kb) == (1, 2) else "nan"}[b]  # 0 unranked, 1 over 2
    batch = build_best_worst(roll, plan, judged(plan, probs))
    assert batch.masked == {"undetermined_tie": 3, "undetermined_failed": 1, "identical": 3}
    assert (batch.chosen, batch.rejected, batch.comparisons) == ([9, 13], [10, 14], [1, 1])
    assert batch.failed == {"timeout": 3, "http_error": 2, "nan": 2}
    # one response with a successful comparison left: undetermined because of the failures
    roll = k_rollouts([["a", "a", "b"]])  # 0 and 1 identical (not judged); (0, 2) failed, (1, 2) judged
    plan = pair_requests(roll, "best_worst")
    assert plan.pairs == [(0, 0, 2), (0, 1, 2)]
    batch = build_best_worst(roll, plan, [Judgment.failed("timeout"), Judgment(prob=0.9)])
    assert (batch.chosen, batch.rejected) == ([1], [2])  # 1 is ranked by its one comparison
    batch = build_best_worst(roll, plan, [Judgment.failed("timeout"), Judgment.failed("timeout")])
    assert batch.masked == {"identical": 1, "undetermined_failed": 1} and batch.size == 0


def test_identical_responses_score_alike_and_ties_go_to_the_lower_index():
    # 0 and 2 identical: both beat 1 and 3 alike; the best is 0 (lower index), the worst is 3
    roll = k_rollouts([["same", "b", "same", "d"]])
    plan = pair_requests(roll, "best_worst")
    assert plan.identical == 1 and (0, 0, 2) not in plan.pairs
    probs = {(0, 0, 1): 0.8, (0, 0, 3): 0.9, (0, 1, 2): 0.2, (0, 1, 3): 0.6, (0, 2, 3): 0.9}
    scores = mean_win_scores(4, [(a, b, probs[(0, a, b)]) for _, a, b in plan.pairs])
    assert scores[0] == pytest.approx(scores[2])
    assert best_and_worst(scores) == (0, 3)
    batch = build_best_worst(roll, plan, judged(plan, probs))
    assert (batch.chosen, batch.rejected, batch.masked) == ([0], [3], {"identical": 1})
    assert best_and_worst([0.5, None, 0.5]) is None and best_and_worst([None, 0.7, None]) is None
    assert best_and_worst([0.25, 0.75, 0.75, 0.25]) == (1, 0)


def test_best_worst_applies_the_missing_eos_penalty_to_each_comparison():
    roll = k_rollouts([["a", "bb", "ccc"]], ended=[[False, True, True]])
    plan = pair_requests(roll, "best_worst")
    probs = {(0, 0, 1): 0.9, (0, 0, 2): 0.9, (0, 1, 2): 0.6}
    assert (build_best_worst(roll, plan, judged(plan, probs)).chosen, ) == ([0],)
    # an infinite penalty: 0 (unfinished) loses both its comparisons; s1 = (1 + 0.6) / 2, s2 = (1 + 0.4) / 2
    batch = build_best_worst(roll, plan, judged(plan, probs), missing_eos_penalty=math.inf, soft_labels=True)
    assert (batch.chosen, batch.rejected) == ([1], [0])
    assert batch.label_probs == pytest.approx([(1 + 0.8 - 0.0) / 2])
