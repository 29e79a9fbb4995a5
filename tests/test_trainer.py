"""End-to-end tests of the loop on a tiny random Llama (real model, real files, rule judges)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import doc_oaif_args
from oaif.config import load_config
from oaif.errors import AnnotatorError, TrainingError
from oaif.run.metrics import METRICS, RECORD_KEYS, StepMetrics, read_metrics
from oaif.step.pairs import build_pairs
from oaif.trainer import Trainer, train

ROOT = Path(__file__).resolve().parent.parent
SHORTER = "oaif.annotators.rules:prefer_shorter"
JUDGES = Path(__file__).resolve().parent / "judges_for_tests.py"


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
    rollouts = t.actor.sample(batch)
    assert rollouts.num_prompts == 4 and rollouts.k == 2
    eos = t.tokenizer.eos_token_id
    for responses, ended in zip(rollouts.responses, rollouts.ended_eos):
        for r, e in zip(responses, ended):
            assert 1 <= len(r) <= 12
            assert e == (r[-1] == eos) and eos not in r[:-1]
    plan, judgments = t.actor.annotate(rollouts)
    prefs = build_pairs(rollouts, plan, judgments)
    assert prefs.size + sum(prefs.masked.values()) + sum(prefs.failed.values()) == 4
    assert prefs.size > 0
    flat_texts = [text for texts in rollouts.texts for text in texts]
    for c, r in zip(prefs.chosen, prefs.rejected):
        assert words(flat_texts[c]) < words(flat_texts[r])  # the rule prefers fewer words


@pytest.mark.gpu
def test_online_training_changes_parameters_and_logs_correct_metrics(tiny_model_dir, tmp_path, train_device):
    out = tmp_path / "run"
    summary = train(tiny_cfg(tiny_model_dir, out, f"train.device={train_device}"))
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
    for r in records:  # TRL's names: rewards/margins is beta * rho; logps are the policy's summed log-probs
        assert r["rewards/margins"] == pytest.approx(0.1 * r["logratio_margin"], abs=1e-7)
        assert r["rewards/margins"] == pytest.approx(r["rewards/chosen"] - r["rewards/rejected"], abs=1e-7)
        assert r["logps/chosen"] < 0 and r["logps/rejected"] < 0
    documented = set(METRICS) | set(RECORD_KEYS)
    assert all(k in documented or k.split("/")[0] + "/<reason>" in documented for r in records for k in r)


def test_identical_pairs_are_masked_and_never_trained_on(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    # a near-zero temperature makes both samples the greedy response: every pair is identical, and a run
    # that trained on nothing ends with an error (its checkpoint saved)
    with pytest.raises(TrainingError, match=r"no pair was usable .*: 8 pairs of identical responses; saved "):
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


# -- helpers for the tests below -----------------------------------------------------------------
def marked_prompts(path: Path, marks: list[str], repeats: int = 4) -> Path:
    """Prompts read in order (with data.shuffle=false); judges_for_tests ties every pair of a TIE prompt."""
    rows = [{"id": f"p{i}-{j}", "prompt": f"{mark}Question {i}.{j}: name something that is {i + j} metres long."}
            for i in range(repeats) for j, mark in enumerate(marks)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def first_micro_batch(cfg):
    """Set up a trainer and collect one micro-batch: what the step-0 update sees."""
    t = Trainer(cfg).setup()
    mb = t.collect(t.next_prompts(), StepMetrics())
    assert mb.prefs.size > 0
    return t, mb


# -- the step's objective is the mean over all of its pairs ---------------------------------------
def test_accumulation_equals_one_larger_batch(tiny_model_dir, tmp_path):
    # micro-batches of 2 prompts: [plain, plain] then [plain, TIE]: 2 pairs, then 1 pair. Every pair of
    # the step must weigh the same, as in one batch of 4 prompts.
    prompts = marked_prompts(tmp_path / "prompts.jsonl", ["", "", "", "TIE "])
    common = [f"data.path={prompts}", "data.shuffle=false", "data.eval_fraction=0", "train.max_steps=2",
              "annotator.type=callable", f"annotator.callable={JUDGES}:shorter_unless_marked"]
    train(tiny_cfg(tiny_model_dir, tmp_path / "accum", *common, "train.batch_size=2",
                   "train.gradient_accumulation_steps=2"))
    train(tiny_cfg(tiny_model_dir, tmp_path / "batch", *common, "train.batch_size=4"))
    accum, batch = read_metrics(tmp_path / "accum" / "metrics.jsonl"), read_metrics(tmp_path / "batch" / "metrics.jsonl")
    for a, b in zip(accum, batch):
        assert a["pairs_used"] == b["pairs_used"] == 3 and a["masked/tie"] == 1
        for key in ("loss", "logratio_margin", "kl", "grad_norm", "response_length"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    # Adam divides by sqrt(v), so parameters with a near-zero gradient turn the float noise of the two
    # batch layouts into differences up to ~1e-5; unequal pair weights moved most parameters by ~lr (1e-3)
    wa, wb = weights(tmp_path / "accum" / "checkpoint-2"), weights(tmp_path / "batch" / "checkpoint-2")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=5e-5, rtol=0, msg=k)


# -- step 0: the policy is the reference --------------------------------------------------------
@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one AcceleratorState per process and refuses another mixed precision in it."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


@pytest.mark.gpu
@pytest.mark.usefixtures("fresh_accelerator_state")
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("precision", [["train.mixed_precision=bf16"], ["model.dtype=bfloat16"]],
                         ids=["autocast_bf16", "weights_bf16"])
def test_bf16_margin_and_kl_are_exactly_zero_at_step_0(tiny_model_dir, tmp_path, lora, precision, train_device):
    cfg = tiny_cfg(tiny_model_dir, tmp_path / "run", *precision, f"model.lora.enabled={str(lora).lower()}",
                   "model.lora.r=4", "model.lora.alpha=8", f"train.device={train_device}")
    t, mb = first_micro_batch(cfg)
    stats = t.update(mb.rollouts, mb.prefs, global_pairs=mb.prefs.size)
    assert stats.loss.margins.numel() == mb.prefs.size
    assert torch.count_nonzero(stats.loss.margins) == 0, stats.loss.margins
    assert stats.kl.numel() == 8 and torch.count_nonzero(stats.kl) == 0, stats.kl  # every sampled response


def test_kl_covers_every_sampled_response_not_only_paired_ones(tiny_model_dir, tmp_path):
    prompts = marked_prompts(tmp_path / "prompts.jsonl", ["", "TIE ", "FAIL ", ""])
    t, mb = first_micro_batch(tiny_cfg(tiny_model_dir, tmp_path / "run", f"data.path={prompts}", "data.shuffle=false",
                                       "data.eval_fraction=0", "annotator.type=callable",
                                       f"annotator.callable={JUDGES}:shorter_unless_marked"))
    assert mb.prefs.size == 2 and len(mb.prefs.responses_used()) == 4
    stats = t.update(mb.rollouts, mb.prefs, global_pairs=mb.prefs.size)
    assert stats.kl.numel() == 8 and torch.count_nonzero(stats.kl) == 0  # all 4 x 2 responses, exact at step 0
    assert stats.train_tokens == sum(len(mb.rollouts.responses[f // 2][f % 2]) for f in mb.prefs.responses_used())


@pytest.fixture(scope="module")
def dropout_model_dir(tmp_path_factory, smollm2_path):
    from helpers import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("dropout_llama"), seed=0, tokenizer_source=smollm2_path,
                           attention_dropout=0.5)


@pytest.mark.parametrize("disable", [True, False])
def test_dropout_is_off_by_default_so_policy_and_reference_agree(dropout_model_dir, tmp_path, disable):
    cfg = tiny_cfg(dropout_model_dir, tmp_path / "run", f"model.disable_dropout={str(disable).lower()}")
    t, mb = first_micro_batch(cfg)
    stats = t.update(mb.rollouts, mb.prefs, global_pairs=mb.prefs.size)
    assert t.unwrapped.training
    if disable:
        assert torch.count_nonzero(stats.loss.margins) == 0 and torch.count_nonzero(stats.kl) == 0
        assert t.unwrapped.config.attention_dropout == 0.0
    else:  # the flag matters: with dropout on, the policy's train-mode forward disagrees with the reference
        assert torch.count_nonzero(stats.loss.margins) > 0


# -- the audit log ------------------------------------------------------------------------------
def test_killed_and_resumed_run_writes_the_audit_log_of_an_uninterrupted_run(tiny_model_dir, tmp_path):
    import os
    import subprocess
    import sys

    def args(out, *extra):
        return [f"model.name_or_path={tiny_model_dir}", f"train.output_dir={out}", "train.max_steps=4",
                "train.save_every=2", "train.batch_size=2", "sampling.max_new_tokens=8", "optim.lr=1.0e-3",
                "optim.warmup_steps=0", "logging.progress_bar=false", "annotator.type=callable",
                f"annotator.callable={JUDGES}:killed_after", f"data.path={ROOT / 'data/prompts/demo_prompts.jsonl'}",
                *extra]

    full, part = tmp_path / "full", tmp_path / "part"
    train(load_config(ROOT / "configs/demo.yaml", args(full)))
    # a pointwise judge is called twice per pair: 2 pairs x 2 calls a step; killed (SIGKILL) during step 4,
    # after step 3 was logged but with step 2 the last checkpoint
    result = subprocess.run([sys.executable, "-m", "oaif.cli", "train", str(ROOT / "configs/demo.yaml"), *args(part)],
                            env=dict(os.environ, OAIF_TEST_KILL_AFTER="12"), capture_output=True, text=True,
                            cwd=ROOT, timeout=600)
    assert result.returncode == -9, result.stderr[-2000:]
    assert (part / "latest").read_text().strip() == "checkpoint-2"
    assert max(json.loads(line)["step"] for line in (part / "annotations.jsonl").read_text().splitlines()) == 3
    train(load_config(ROOT / "configs/demo.yaml", args(part, "train.resume=true")))

    def audit(run):
        lines = [json.loads(line) for line in (run / "annotations.jsonl").read_text().splitlines()]
        return [{k: v for k, v in line.items() if k != "latency_s"} for line in lines]

    assert len(audit(full)) == sum(r["pairs_judged"] for r in read_metrics(full / "metrics.jsonl")) == 8
    assert audit(part) == audit(full)


# -- every loss and option runs through the trainer ----------------------------------------------
OPTIONS = {
    # at step 1 rho = 0: IPO's loss is (0 - 1/(2 beta))^2 = 25 with beta 0.1, with soft labels too
    "ipo_soft_labels": (["loss.type=ipo", "loss.soft_labels=true"], 25.0),
    # SLiC's loss at rho = 0 is max(0, 1 - 0) = 1
    "slic_min_confidence": (["loss.type=slic", "loss.min_confidence=0.15"], 1.0),
    "dpo_all_pairs_top_p_temperature": (["sampling.pairing=all", "sampling.num_samples=3", "sampling.top_p=0.9",
                                         "sampling.temperature=1.3", "loss.missing_eos_penalty=1.0"], math.log(2)),
    "hf_backend": (["sampling.backend=hf"], math.log(2)),
    # cDPO at rho = 0: (1 - eps) log 2 + eps log 2; smoothed IPO: (1 - eps) 5^2 + eps (-5)^2 = 25
    "dpo_label_smoothing_soft_labels": (["loss.label_smoothing=0.1", "loss.soft_labels=true"], math.log(2)),
    "ipo_label_smoothing": (["loss.type=ipo", "loss.label_smoothing=0.2"], 25.0),
    # simpo has no reference, so no kl; its loss is a mean of softplus(-x) over pairs with x = beta * (margin -
    # gamma/beta), at least softplus(-mean x) (Jensen), where mean x = rewards/margins - gamma
    "simpo": (["loss.type=simpo"], lambda r: "kl" not in r and r["loss"] >= math.log1p(
        math.exp(2.0 * 0.5 - r["rewards/margins"])) - 1e-6 and r["rewards/margins"] == pytest.approx(
        2.0 * r["logratio_margin"])),
    # rpo at rho = 0: log 2 plus alpha times a per-token NLL (> 0); rdpo at rho = 0 depends on the lengths only
    "rpo_soft_labels": (["loss.type=rpo", "loss.soft_labels=true"],
                        lambda r: r["kl"] == 0 and r["logratio_margin"] == 0 and r["loss"] > math.log(2)),
    "rdpo": (["loss.type=rdpo", "loss.rdpo_alpha=0.05"],
             lambda r: r["kl"] == 0 and r["logratio_margin"] == 0 and 0 < r["loss"] < 10),
}


@pytest.mark.parametrize("name", OPTIONS)
def test_every_loss_and_option_runs_through_the_trainer(tiny_model_dir, tmp_path, name):
    overrides, first_loss = OPTIONS[name]
    out = tmp_path / "run"
    cfg = tiny_cfg(tiny_model_dir, out, "train.max_steps=2", "annotator.type=callable",
                   f"annotator.callable={JUDGES}:graded_by_length", *overrides)
    train(cfg)
    records = read_metrics(out / "metrics.jsonl")
    audit = [json.loads(line) for line in (out / "annotations.jsonl").read_text().splitlines()]
    pairs_per_prompt = 3 if cfg.sampling.pairing == "all" else 1
    if callable(first_loss):
        assert first_loss(records[0]), records[0]
    else:
        assert records[0]["loss"] == pytest.approx(first_loss, rel=1e-5)
    for r in records:
        assert r["pairs_judged"] + r["masked/identical"] == 4 * pairs_per_prompt
        assert 1 <= r["response_length"] <= 12
    ties = sum(abs(a["prob"] - 0.5) < cfg.loss.min_confidence or a["prob"] == 0.5 for a in audit)
    assert sum(r["masked/tie"] for r in records) == ties
    assert sum(r["pairs_used"] for r in records) == len(audit) - ties > 0
    before, after = weights(tiny_model_dir), weights(out / "checkpoint-2")
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_soft_labels_are_the_judged_probabilities(tiny_model_dir, tmp_path):
    cfg = tiny_cfg(tiny_model_dir, tmp_path / "run", "annotator.type=callable", "loss.soft_labels=true",
                   f"annotator.callable={JUDGES}:graded_by_length")
    t = Trainer(cfg).setup()
    rollouts = t.actor.sample(t.next_prompts())
    plan, judgments = t.actor.annotate(rollouts)
    prefs = build_pairs(rollouts, plan, judgments, soft_labels=True)
    probs = sorted(max(j.prob, 1 - j.prob) for j in judgments if j.prob != 0.5)
    assert sorted(prefs.label_probs) == pytest.approx(probs) and all(0.5 < p < 0.9 for p in probs)


# -- best-of-K pairs ------------------------------------------------------------------------------
def test_best_worst_pairing_trains_on_the_shortest_against_the_longest(tiny_model_dir, tmp_path):
    # per step: two plain prompts, one whose comparisons all tie, one whose comparisons all fail
    prompts = marked_prompts(tmp_path / "prompts.jsonl", ["", "", "TIE ", "FAIL "])
    extra = ["sampling.num_samples=4", "sampling.pairing=best_worst", f"data.path={prompts}", "data.shuffle=false",
             "data.eval_fraction=0", f"annotator.callable={JUDGES}:shorter_unless_marked", "train.max_steps=2"]
    t, mb = first_micro_batch(tiny_cfg(tiny_model_dir, tmp_path / "first", *extra))
    roll, prefs = mb.rollouts, mb.prefs
    assert roll.k == 4
    flat = [text for texts in roll.texts for text in texts]
    for c, r in zip(prefs.chosen, prefs.rejected):  # the rule prefers fewer characters: best = shortest
        b = c // 4
        assert r // 4 == b and roll.prompt_texts[b].startswith("Question")
        lengths = [len(text) for text in roll.texts[b]]
        assert len(flat[c]) == min(lengths) < len(flat[r]) == max(lengths)
    assert prefs.masked["undetermined_tie"] >= 1 and prefs.masked["undetermined_failed"] == 1
    t.close()

    out = tmp_path / "run"
    train(tiny_cfg(tiny_model_dir, out, *extra))
    records = read_metrics(out / "metrics.jsonl")
    audit = [json.loads(line) for line in (out / "annotations.jsonl").read_text().splitlines()]
    assert len(audit) == sum(r["pairs_judged"] for r in records)  # one line per judged comparison
    assert records[0]["loss"] == pytest.approx(math.log(2), rel=1e-5)
    for r in records:
        assert r["pairs_judged"] + r["masked/identical"] == 4 * 6  # every pair of the 4 responses of 4 prompts
        assert r["masked/undetermined_failed"] == 1 and r["pairs_failed"] == r["failed/nan"] >= 1
        assert r["pairs_used"] + r["masked/undetermined_tie"] + r["masked/undetermined_failed"] + r["masked/tie"] == 4
        assert r["pairs_masked"] == r["masked/identical"] + r["masked/undetermined_tie"] + 1 + r["masked/tie"]
    used = [r for r in records if r["pairs_used"]]
    assert used and all(1 <= r["comparisons_per_pair"] <= 6 for r in used)
    before, after = weights(tiny_model_dir), weights(out / "checkpoint-2")
    assert any(not torch.equal(before[k], after[k]) for k in before)


# -- offline mode tokenizes as online mode samples ----------------------------------------------
@pytest.fixture(scope="module")
def end_of_turn_model_dir(tmp_path_factory, smollm2_path):
    """As with Llama 3: the tokenizer's EOS (<|endoftext|>) is not what ends an assistant turn in the chat
    template (<|im_end|>); generation stops on both."""
    from transformers import AutoTokenizer, GenerationConfig

    from helpers import make_tiny_llama

    path = make_tiny_llama(tmp_path_factory.mktemp("eot_llama"), seed=0, tokenizer_source=smollm2_path)
    tok = AutoTokenizer.from_pretrained(path)
    tok.eos_token = "<|endoftext|>"
    tok.save_pretrained(path)
    gen = GenerationConfig.from_pretrained(path)
    gen.eos_token_id = [tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|im_end|>")]
    gen.save_pretrained(path)
    return path


def test_offline_pairs_are_tokenized_like_online_samples(end_of_turn_model_dir, tmp_path):
    rows = [{"prompt": f"Name a colour ({i}).", "chosen": "Blue.", "rejected": "Well, " + "there are many colours, " * 8}
            for i in range(6)] + [{"prompt": "word " * 400, "chosen": "a", "rejected": "b"}]
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_cfg(end_of_turn_model_dir, tmp_path / "run", "train.mode=offline", f"data.preference_path={prefs}",
                   "train.max_steps=2", "train.batch_size=3")
    t = Trainer(cfg).setup()
    assert t.parts.prompts.skipped == {"too_long": 1}  # data.max_prompt_tokens, as online
    eot = t.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert t.parts.end_of_turn == eot != t.tokenizer.eos_token_id
    metrics = StepMetrics()
    mb = t.collect(t.next_prompts(), metrics)
    blue = t.tokenizer("Blue.", add_special_tokens=False)["input_ids"]
    for (chosen, rejected), (chosen_ended, rejected_ended) in zip(mb.rollouts.responses, mb.rollouts.ended_eos):
        assert chosen == blue + [eot] and chosen_ended  # ends as a sampled response that stopped
        assert len(rejected) == 12 and eot not in rejected and not rejected_ended  # cut at sampling.max_new_tokens
    record = metrics.record()
    assert record["responses_truncated"] == 3 and record["eos_rate"] == 0.5 and record["pairs_used"] == 3
    assert not [k for k in record if k.startswith("judge_")] and "kl" not in record  # no judge, no samples

    summary = train(cfg)
    assert summary["skipped_inputs"] == {"too_long": 1}
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert all(r["responses_truncated"] == 3 and "judge_confidence" not in r for r in records)


# -- the judge noise check (oaif.run.judge_noise) -------------------------------------------------
def judged_step(consistent: int, both: int, confidence: float, judged: int) -> StepMetrics:
    m = StepMetrics()
    m.add("judge_consistency", consistent, both)
    m.add("judge_confidence", confidence * judged, judged)
    return m


def test_the_noise_window_measures_the_last_pairs_and_warns_once():
    from oaif.run.judge_noise import NoiseWindow

    w = NoiseWindow(8)
    w.add(judged_step(4, 4, 0.95, 4))  # a clean step, then noise
    assert w.warning() is None  # 4 pairs: the window is not full
    w.add(judged_step(0, 4, 0.51, 4))
    assert w.warning() is None  # 8 pairs, half of them clean: consistency 0.5 is not under 0.5
    w.add(judged_step(0, 4, 0.52, 4))  # the clean step leaves the window
    assert (w.window.consistency, w.window.judged) == (0.0, 8)
    message = w.warning()
    assert message.startswith("the judge's labels look no better than coin flips: both-order consistency 0.000")
    assert "mean |P - 0.5| 0.015 (noise under 0.1) over 8 judged pairs (annotator.noise_window=8)" in message
    assert "Which judge runs here?" in message
    w.add(judged_step(0, 4, 0.5, 4))
    assert w.warning() is None  # once per run
    # over the whole run the clean first step lifts the mean preference past the threshold
    assert w.summary() == ("both-order consistency 0.250 (noise under 0.5), mean |P - 0.5| 0.120 (noise under 0.1) "
                           "over 16 judged pairs: better than coin flips")


def test_a_judge_without_both_orders_is_not_called_noise_and_0_turns_the_warning_off():
    from oaif.run.judge_noise import NoiseWindow

    one_order = NoiseWindow(4)
    one_order.add(judged_step(0, 0, 0.5, 4))  # both_orders=false: no consistency, a preference of exactly 0.5
    assert one_order.warning() is None
    assert one_order.summary().startswith("both-order consistency not measured")
    off = NoiseWindow(0)
    off.add(judged_step(0, 4, 0.5, 4))
    assert off.warning() is None and off.summary().endswith("no better than coin flips; " + ADVICE_TEXT)
    assert NoiseWindow(4).summary() is None  # nothing judged (offline)


ADVICE_TEXT = ("use a stronger judge (docs/judges.md, \"Which judge runs here?\") or a rule or reward model "
               "(annotator.type=callable or reward_model)")


def demo_cli(out, *extra) -> list[str]:
    """The README's main job, `oaif train configs/demo.yaml`, cut to 2 steps with a 4-pair noise window."""
    command, config = doc_oaif_args("scripts/setup.sh && .venv/bin/oaif train configs/demo.yaml")
    return [command, str(ROOT / config), f"train.output_dir={out}", "train.max_steps=2",
            "annotator.noise_window=4", "logging.progress_bar=false", f"data.path={ROOT / 'data/prompts/demo_prompts.jsonl'}",
            *extra]


@pytest.mark.slow
def test_the_demo_judge_warns_that_its_labels_are_coin_flips(smollm2_path, tmp_path, capsys):
    # the demo itself (the embedded SmolLM2 judging its own samples, 4 pairs a step), with a 4-pair window
    # instead of 32 so that 2 steps suffice: both windows are noise, the warning comes once
    from oaif.cli import main

    out = tmp_path / "demo"
    assert main(demo_cli(out)) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("oaif: warning: the judge's labels")]
    assert len(warnings) == 1, captured.err[-3000:]
    assert "(annotator.noise_window=4); use a stronger judge" in warnings[0]
    lines = captured.out.splitlines()
    assert lines[0] == f"done: 2 steps, checkpoint {out / 'checkpoint-2'}"
    judge = next(line for line in lines if line.startswith("judge: "))
    assert judge.endswith("judged pairs: no better than coin flips; " + ADVICE_TEXT)
    records = read_metrics(out / "metrics.jsonl")
    assert all(r["judge_consistency"] < 0.5 and r["judge_confidence"] < 0.6 for r in records)
    assert lines[-2].startswith(f"plots: oaif plot {out} ") and lines[-1].startswith(f"next: oaif eval --run {out} ")


@pytest.mark.slow
def test_the_rule_judge_does_not_warn(smollm2_path, tmp_path, capsys):
    from oaif.cli import main

    out = tmp_path / "rule"
    assert main(demo_cli(out, "annotator.type=callable", f"annotator.callable={SHORTER}")) == 0
    captured = capsys.readouterr()
    assert "oaif: warning" not in captured.err
    judge = next(line for line in captured.out.splitlines() if line.startswith("judge: "))
    assert judge.startswith("judge: both-order consistency 1.000") and judge.endswith(": better than coin flips")
