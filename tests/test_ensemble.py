"""EnsembleJudge over real CallableJudge members (cheap), one of which always fails."""

from __future__ import annotations

import pytest

from oaif.annotators.base import Annotator, PairRequest
from oaif.annotators.callable_judge import CallableJudge
from oaif.annotators.ensemble import EnsembleJudge
from oaif.errors import AnnotatorError

# Fixed one-order probabilities per pair (keyed by response a), so the hand checks are exact.
P1 = {"a1": 0.9, "a2": 0.2, "a3": 0.5, "a4": 0.6}
P2 = {"a1": 0.7, "a2": 0.4, "a3": 0.8, "a4": 0.1}
P3 = {"a1": 0.2, "a2": 0.3, "a3": 0.5, "a4": 0.7}


def _member(table, name):
    return CallableJudge(lambda prompt, a, b: table[a], both_orders=False, name=name)


def _broken(prompt, a, b):
    raise RuntimeError("judge is down")


REQS = [PairRequest("q", f"a{i}", "b", f"p{i}") for i in range(1, 5)]


def test_mean_mode_hand_checked():
    ens = EnsembleJudge([_member(P1, "one"), _member(P2, "two"), CallableJudge(_broken, name="down")])
    assert isinstance(ens, Annotator)
    out = ens.annotate(REQS)
    expected = [(0.9 + 0.7) / 2, (0.2 + 0.4) / 2, (0.5 + 0.8) / 2, (0.6 + 0.1) / 2]
    assert [j.prob for j in out] == pytest.approx(expected)
    for j, r in zip(out, REQS):
        a = r.a
        assert j.ok and j.judge == ens.name
        assert j.extra["members"] == {"one": P1[a], "two": P2[a], "down": "callable_error"}
        assert j.extra["n_ok"] == 2
        assert j.prob_ab == pytest.approx((P1[a] + P2[a]) / 2) and j.prob_ba is None


def test_majority_mode_hand_checked():
    ens = EnsembleJudge([_member(P1, "one"), _member(P2, "two"), _member(P3, "three")], mode="majority")
    out = ens.annotate(REQS)
    # a1: yes yes no -> 2/3; a2: no no no -> 0; a3: tie yes tie -> (0.5+1+0.5)/3; a4: yes no yes -> 2/3
    assert [j.prob for j in out] == pytest.approx([2 / 3, 0.0, 2 / 3, 2 / 3])
    assert ens.name.startswith("ensemble:majority:")


def test_prob_ab_ba_averaged_over_members_that_report_them():
    both = CallableJudge(lambda prompt, a, b: 0.8 if a == "a1" else 0.4, name="both")  # both orders
    one = _member(P1, "one")
    [j] = EnsembleJudge([both, one]).annotate(REQS[:1])
    assert j.prob == pytest.approx((0.7 + 0.9) / 2)  # both: (0.8 + (1 - 0.4)) / 2 = 0.7
    assert j.prob_ab == pytest.approx((0.8 + 0.9) / 2)
    assert j.prob_ba == pytest.approx(0.6)


def test_all_failed():
    ens = EnsembleJudge([CallableJudge(_broken, name="x"), CallableJudge(lambda p, a, b: float("nan"), name="y")])
    out = ens.annotate(REQS[:2])
    for j in out:
        assert not j.ok and j.prob is None and j.failure == "all_failed"
        assert j.extra["members"] == {"x": "callable_error", "y": "nan"}
    assert ens.agreement() == {}


def test_agreement_accumulates_over_calls():
    ens = EnsembleJudge([_member(P1, "one"), _member(P2, "two"), _member(P3, "three"),
                         CallableJudge(_broken, name="down")])
    ens.annotate(REQS[:2])
    assert ens.agreement() == pytest.approx({"one": 1.0, "two": 1.0, "three": 0.5})
    ens.annotate(REQS[2:])
    # ensemble (mean): a1 0.6 -> a; a2 0.3 -> b; a3 0.6 -> a; a4 0.4667 -> b
    # one:   a b tie a -> 1 + 1 + 0.5 + 0 ; two: a b a b -> 4 ; three: b b tie a -> 0 + 1 + 0.5 + 0
    # down never judged a pair: left out
    assert ens.agreement() == pytest.approx({"one": 2.5 / 4, "two": 1.0, "three": 1.5 / 4})


def test_duplicate_names_and_validation():
    ens = EnsembleJudge([_member(P1, "same"), _member(P2, "same")])
    assert ens.member_names == ["same", "same#2"]
    assert set(ens.annotate(REQS[:1])[0].extra["members"]) == {"same", "same#2"}
    assert ens.annotate([]) == []
    with pytest.raises(AnnotatorError, match="at least one"):
        EnsembleJudge([])
    with pytest.raises(AnnotatorError, match="mode"):
        EnsembleJudge([_member(P1, "one")], mode="median")


def test_ensemble_built_from_config():
    from oaif.annotators.build import build_annotator
    from oaif.config import load_config
    from oaif.errors import ConfigError

    cfg = load_config(None, ["annotator.type=ensemble", "annotator.ensemble_mode=majority",
                             "annotator.members=[{type: callable, callable: 'oaif.annotators.rules:prefer_shorter'},"
                             " {type: callable, callable: 'oaif.annotators.rules:prefer_no_digits'}]"])
    judge = build_annotator(cfg.annotator)
    [j] = judge.annotate([PairRequest("q", "one two three 4", "one")])
    assert j.prob == 0.0 and set(j.extra["members"]) == {"callable:prefer_shorter", "callable:prefer_no_digits"}
    with pytest.raises(ConfigError, match=r"annotator.members\[0\].rubrik"):  # found when the config loads
        load_config(None, ["annotator.type=ensemble", "annotator.members=[{rubrik: helpful}]"])


def _preflight_cfg(tmp_path, *overrides):
    from pathlib import Path

    from oaif.config import load_config

    prompts = Path(__file__).resolve().parent.parent / "data/prompts/demo_prompts.jsonl"
    return load_config(None, [f"data.path={prompts}", f"train.output_dir={tmp_path / 'run'}", *overrides])


def test_ensemble_members_are_checked_before_any_member_loads(tmp_path):
    """A member's bad rubric is found by the run's preflight, and by a build before an earlier member's model loads."""
    from oaif.annotators.build import build_annotator
    from oaif.config import AnnotatorConfig
    from oaif.run.build import preflight

    bad_member = "{type: llm, rubric: no_such_rubric}"
    with pytest.raises(AnnotatorError, match="unknown rubric 'no_such_rubric'"):
        preflight(_preflight_cfg(tmp_path, "annotator.type=ensemble",
                                 f"annotator.members=[{{type: callable, callable: 'oaif.annotators.rules:prefer_shorter'}}, {bad_member}]"))
    cfg = AnnotatorConfig(type="ensemble", members=[{"type": "llm", "model": str(tmp_path / "no_such_model")},
                                                    {"type": "llm", "rubric": "no_such_rubric"}])
    with pytest.raises(AnnotatorError, match="unknown rubric 'no_such_rubric'"):  # not member 0's missing model
        build_annotator(cfg)


def test_ensemble_members_naming_one_judge_model_share_one_copy(tiny_model_dir):
    from oaif.annotators.build import build_annotator
    from oaif.config import AnnotatorConfig

    cfg = AnnotatorConfig(type="ensemble", members=[{"type": "llm", "model": tiny_model_dir, "rubric": "helpful"},
                                                    {"type": "llm", "model": tiny_model_dir, "rubric": "harmless"}])
    helpful, harmless = build_annotator(cfg).judges
    assert helpful.rubric.name != harmless.rubric.name
    assert helpful.model is harmless.model and not any(p.requires_grad for p in helpful.model.parameters())
