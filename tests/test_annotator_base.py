"""The helpers every judge and every caller of judges shares (oaif.annotators.base)."""

from __future__ import annotations

import pytest
import torch

from oaif.annotators.base import Judgment, PairRequest, annotate_all, eval_mode, failure_counts, frozen
from oaif.annotators.callable_judge import CallableJudge
from oaif.errors import AnnotatorError

REQS = [PairRequest("q", f"a{i}", "b", f"p{i}") for i in range(5)]


class Recorder:
    """A real judge (a rule) that records the size of every batch it is given."""

    name = "recorder"

    def __init__(self, drop_last: bool = False):
        self.rule = CallableJudge(lambda prompt, a, b: 0.75, both_orders=False)
        self.batches: list[int] = []
        self.drop_last = drop_last

    def annotate(self, requests):
        self.batches.append(len(requests))
        out = self.rule.annotate(requests)
        return out[:-1] if self.drop_last else out


def test_annotate_all_batches_in_order_and_reports_progress():
    judge, seen = Recorder(), []
    out = annotate_all(judge, REQS, 2, on_batch=lambda js: seen.append(len(js)))
    assert judge.batches == [2, 2, 1] and seen == [2, 4, 5]
    assert [j.prob for j in out] == [0.75] * 5
    assert annotate_all(judge, [], 2) == []


def test_annotate_all_rejects_a_judge_that_loses_judgments():
    with pytest.raises(AnnotatorError, match="annotator recorder returned 1 judgments for 2 pairs"):
        annotate_all(Recorder(drop_last=True), REQS, 2)


def test_prob_for_and_failure_counts():
    ok, failed = Judgment(prob=0.8), Judgment.failed("timeout")
    assert ok.prob_for(True) == 0.8 and ok.prob_for(False) == pytest.approx(0.2)
    assert failed.prob_for(True) is None and failed.prob_for(False) is None
    js = [ok, Judgment.failed("timeout"), Judgment.failed("nan"), failed, Judgment(prob=None)]
    assert failure_counts(js) == {"nan": 1, "no_prob": 1, "timeout": 2}
    assert list(failure_counts(js)) == ["nan", "no_prob", "timeout"]


def test_eval_mode_and_frozen_restore_and_set_the_mode():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5)).train()
    with pytest.raises(RuntimeError):
        with eval_mode(model):
            assert not model.training and not model[1].training
            raise RuntimeError("inside")
    assert model.training and model[1].training  # restored even when the block raised
    assert frozen(model) is model and not model.training
    assert not any(p.requires_grad for p in model.parameters())
