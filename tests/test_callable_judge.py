"""CallableJudge on real Python rules: pointwise scores become Bradley-Terry probabilities."""

from __future__ import annotations

import pytest

from oaif.annotators.base import PairRequest
from oaif.annotators.callable_judge import CallableJudge


def _scores(table):
    return lambda prompt, response: table[response]


@pytest.mark.parametrize("gap", [1e4, -1e4, 800.0, -800.0])
def test_pointwise_score_gaps_beyond_exp_range_give_certain_judgments(gap):
    """math.exp overflows past ~709: a huge score gap is a sure preference, not a failed pair."""
    judge = CallableJudge(_scores({"a": gap, "b": 0.0}))
    [j] = judge.annotate([PairRequest("q", "a", "b")])
    assert j.ok, j.failure
    assert j.prob == (1.0 if gap > 0 else 0.0) and j.prob_ab == j.prob_ba == j.prob


def test_pointwise_probability_is_the_logistic_of_the_gap():
    judge = CallableJudge(_scores({"a": 3.0, "b": 1.0, "c": float("nan")}))
    j_ab, j_ba, j_nan = judge.annotate([PairRequest("q", "a", "b"), PairRequest("q", "b", "a"),
                                        PairRequest("q", "a", "c")])
    assert j_ab.prob == pytest.approx(0.8807970779778823)  # 1 / (1 + e^-2)
    assert j_ba.prob == pytest.approx(1 - 0.8807970779778823)
    assert j_nan.failure == "nan" and j_nan.prob is None


def test_an_unknown_judge_type_is_one_line():
    from oaif.annotators.build import build_annotator
    from oaif.config import AnnotatorConfig
    from oaif.errors import AnnotatorError

    with pytest.raises(AnnotatorError) as e:
        build_annotator(AnnotatorConfig(type="oracle"))  # built in code, so not refused when the config loads
    assert str(e.value) == "annotator.type='oracle' is not available yet in this build"


def test_a_callable_with_the_wrong_arguments_is_refused_by_the_run_s_preflight(tmp_path):
    from pathlib import Path

    from oaif.config import load_config
    from oaif.errors import AnnotatorError
    from oaif.run.build import preflight

    prompts = Path(__file__).resolve().parent.parent / "data/prompts/demo_prompts.jsonl"
    cfg = load_config(None, [f"data.path={prompts}", f"train.output_dir={tmp_path / 'run'}", "annotator.type=callable",
                             "annotator.callable=os.path:basename"])  # takes one argument, not (prompt, a, b)
    with pytest.raises(AnnotatorError, match="must take \\(prompt, a, b\\) or \\(prompt, response\\), it takes 1"):
        preflight(cfg)


def test_a_pointwise_score_is_computed_once_per_distinct_reply_of_a_batch():
    """Four replies paired all ways (six pairs) take four scores, not twelve; the probabilities are the same."""
    calls, fails = [], {"d": 1}

    def score(prompt, response):
        calls.append((prompt, response))
        if fails.get(response):  # the first scoring of d raises: that pair is masked, a later one retries
            fails[response] -= 1
            raise TimeoutError("slow server")
        return {"a": 2.0, "b": 1.0, "c": 0.0, "d": -1.0}[response]

    replies = ["a", "b", "c", "d"]
    pairs = [PairRequest(q, x, y) for q in ("q1", "q2") for i, x in enumerate(replies) for y in replies[i + 1:]]
    judgments = CallableJudge(score).annotate(pairs)
    assert len(calls) == 2 * 4 + 1  # each (prompt, reply) once, plus the retry after d's error
    first_d = next(i for i, p in enumerate(pairs) if "d" in (p.a, p.b))
    assert judgments[first_d].failure == "callable_error"
    ok = [(p, j) for p, j in zip(pairs, judgments) if j.ok]
    assert len(ok) == len(pairs) - 1
    import math
    table = {"a": 2.0, "b": 1.0, "c": 0.0, "d": -1.0}
    assert all(j.prob == pytest.approx(1 / (1 + math.exp(table[p.b] - table[p.a]))) for p, j in ok)
    CallableJudge(score).annotate(pairs[:1])
    assert len(calls) == 2 * 4 + 1 + 2  # a new batch scores again
