"""End-to-end tests of the loop on a tiny random Llama (real model, real files, rule judges)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from oaif.config import load_config
from oaif.errors import AnnotatorError
from oaif.metrics import read_metrics
from oaif.pairs import build_pairs
from oaif.trainer import Trainer, train

ROOT = Path(__file__).resolve().parent.parent
SHORTER = "oaif.annotators.rules:prefer_shorter"


def tiny_cfg(model_dir, out, *extra):
    return load_config(ROOT / "configs" / "demo.yaml", [
        f"model.name_or_path={model_dir}", "annotator.type=callable", f"annotator.callable={SHORTER}",
        f"train.output_dir={out}", "train.max_steps=3", "train.batch_size=4", "sampling.max_new_tokens=12",
        "optim.lr=1.0e-3", "optim.warmup_steps=0", "logging.progress_bar=false", f"data.path={ROOT / 'data/prompts/demo_prompts.jsonl'}",
        *extra])


def weights(path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(path) / "model.safetensors"))


def words(text: str) -> int:
    return len(text.split())


def test_steps_run_alone_and_chosen_follows_the_annotator(tiny_model_dir, tmp_path):
    t = Trainer(tiny_cfg(tiny_model_dir, tmp_path / "run")).setup()
    batch = t.next_prompts()
    assert len(batch) == 4
    rollouts = t.sample(batch)
    assert rollouts.num_prompts == 4 and rollouts.k == 2
    eos = t.tokenizer.eos_token_id
    for responses, ended in zip(rollouts.responses, rollouts.ended_eos):
        for r, e in zip(responses, ended):
            assert 1 <= len(r) <= 12
            assert e == (r[-1] == eos) and eos not in r[:-1]
    plan, judgments = t.annotate(rollouts)
    prefs = build_pairs(rollouts, plan, judgments)
    assert prefs.size + sum(prefs.masked.values()) + sum(prefs.failed.values()) == 4
    assert prefs.size > 0
    flat_texts = [text for texts in rollouts.texts for text in texts]
    for c, r in zip(prefs.chosen, prefs.rejected):
        assert words(flat_texts[c]) < words(flat_texts[r])  # the rule prefers fewer words


def test_online_training_changes_parameters_and_logs_correct_metrics(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    summary = train(tiny_cfg(tiny_model_dir, out))
    assert summary["steps"] == 3
    before, after = weights(tiny_model_dir), weights(out / "checkpoint-3")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    first = records[0]
    # at step 1 the policy is the reference: zero KL, zero margins, DPO loss = log 2
    assert first["kl"] == 0.0 and first["logratio_margin"] == 0.0
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for r in records:
        assert r["pairs_used"] + r["pairs_masked"] + r["pairs_failed"] == 4
        assert 1 <= r["response_length"] <= 12 and 0 <= r["eos_rate"] <= 1
        assert r["judge_consistency"] == 1.0  # a pointwise rule is order-free
        for key in ("time_sample_s", "time_annotate_s", "time_update_s", "gen_tokens_per_s", "grad_norm", "lr"):
            assert key in r
    audit = [json.loads(line) for line in (out / "annotations.jsonl").read_text().splitlines()]
    assert len(audit) == sum(r["pairs_judged"] for r in records)
    assert all(a["judge"] == "callable:prefer_shorter" and a["failure"] is None for a in audit)


def test_identical_pairs_are_masked_and_never_trained_on(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    # a near-zero temperature makes both samples the greedy response: every pair is identical
    train(tiny_cfg(tiny_model_dir, out, "sampling.temperature=1.0e-6", "train.max_steps=2"))
    records = read_metrics(out / "metrics.jsonl")
    assert all(r["masked/identical"] == 4 and r["pairs_used"] == 0 and r["pairs_judged"] == 0 for r in records)
    before, after = weights(tiny_model_dir), weights(out / "checkpoint-2")
    assert all(torch.equal(before[k], after[k]) for k in before)


def failing_judge(prompt, a, b):
    raise TimeoutError("judge unreachable")


def test_failed_judgments_are_counted_and_stop_the_run_after_a_checkpoint(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_cfg(tiny_model_dir, out, f"annotator.callable={__file__}:failing_judge",
                   "annotator.failure_window=8", "train.max_steps=10")
    with pytest.raises(AnnotatorError, match="failed on 100% of the last 8 pairs.*callable_error: 8"):
        train(cfg)
    records = read_metrics(out / "metrics.jsonl")
    assert [r["pairs_failed"] for r in records] == [4, 4] and all(r["pairs_used"] == 0 for r in records)
    assert (out / "latest").read_text().strip() == "checkpoint-2"
    before, after = weights(tiny_model_dir), weights(out / "checkpoint-2")
    assert all(torch.equal(before[k], after[k]) for k in before)
    audit = [json.loads(line) for line in (out / "annotations.jsonl").read_text().splitlines()]
    assert len(audit) == 8 and all(a["failure"] == "callable_error" and a["prob"] is None for a in audit)


class Interrupt:
    """A judge that raises KeyboardInterrupt on its n-th call, standing in for a killed run."""

    calls = 0

    @classmethod
    def judge(cls, prompt, response):
        cls.calls += 1
        if cls.calls > cls.limit:
            raise KeyboardInterrupt
        return -float(len(response.split()))


def test_resumed_run_matches_uninterrupted_run(tiny_model_dir, tmp_path, monkeypatch):
    full = tmp_path / "full"
    train(tiny_cfg(tiny_model_dir, full, "train.max_steps=4", "train.gradient_accumulation_steps=2"))

    part = tmp_path / "part"
    # interrupted during step 3: 2 steps x 2 micro-batches x 4 pairs x 2 scores = 32 calls done
    Interrupt.calls, Interrupt.limit = 0, 32
    cfg = tiny_cfg(tiny_model_dir, part, "train.max_steps=4", "train.gradient_accumulation_steps=2")
    from oaif.annotators.callable_judge import CallableJudge

    with pytest.raises(KeyboardInterrupt):
        train(cfg, annotator=CallableJudge(Interrupt.judge))
    assert (part / "latest").read_text().strip() == "checkpoint-2"
    train(tiny_cfg(tiny_model_dir, part, "train.max_steps=4", "train.gradient_accumulation_steps=2", "train.resume=true"))

    a, b = weights(full / "checkpoint-4"), weights(part / "checkpoint-4")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    assert any(not torch.equal(a[k], weights(tiny_model_dir)[k]) for k in a)
    ma, mb = read_metrics(full / "metrics.jsonl"), read_metrics(part / "metrics.jsonl")
    assert [r["step"] for r in mb] == [1, 2, 3, 4]
    for ra, rb in zip(ma, mb):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-6)
        assert ra["prompts_seen"] == rb["prompts_seen"]


def test_offline_mode_learns_the_file_preferences(tiny_model_dir, tmp_path):
    prefs = tmp_path / "prefs.jsonl"
    rows = [{"prompt": f"Name a colour ({i}).", "chosen": "Blue.", "rejected": "Well, there are many colours, "
             "and it is hard to choose just one of them, but perhaps I would say green."} for i in range(16)]
    prefs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    train(tiny_cfg(tiny_model_dir, out, "train.mode=offline", f"data.preference_path={prefs}", "train.max_steps=4"))
    records = read_metrics(out / "metrics.jsonl")
    assert all(r["pairs_used"] == 4 for r in records)
    assert records[0]["logratio_margin"] == 0.0 and records[-1]["logratio_margin"] > 0 and records[-1]["reward_accuracy"] == 1.0
    assert records[-1]["loss"] < records[0]["loss"]
