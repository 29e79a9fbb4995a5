"""Building training pairs from judgments: orientation, masking, TRL's missing-EOS penalty."""

from __future__ import annotations

import math

import pytest

from oaif.annotators.base import Judgment
from oaif.step.pairs import build_pairs, pair_requests, penalize_unfinished
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
