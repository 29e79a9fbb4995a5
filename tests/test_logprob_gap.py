"""``logprob_gap``: the sampler's log-prob of each drawn token against the update's, a stale-weight detector.

The arithmetic (a mean over the real tokens of the paired responses, summed like every metric), the
samplers' log-probs (raw logits: no temperature, no top-p), the bound a synchronous run stays under in
float32 and under bf16 autocast, and a stale sampler that the gap catches and the run warns about. The
transformers backends sample the live policy, so a missed push cannot happen to them: the stale case
gives the trainer a sampler over a copy of the starting weights, which no step updates. The vLLM
versions (an engine that skips one push) are in ``test_vllm_colocated_trainer.py``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from oaif.config import load_config
from oaif.models.chat import encode_prompt
from oaif.run.metrics import GapWatch, StepMetrics, read_metrics
from oaif.step.logprobs import logprob_gap, pack_sequences, sequence_logprobs
from oaif.step.update import UpdateStats

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["What is 2+2?", "Name a color.", "Write a haiku about the sea, please."]
#: Bounds of a synchronous run's logprob_gap on the tiny random Llama (initializer range 0.2, so that the
#: log-probs are far from uniform) on a 2-core CPU, with room: measured at most 1.1e-6 (float32) and 2.4e-3 (bf16
#: autocast) over these tests' 3 steps. A real model under bf16 sits higher (DEVELOPERS.md, Metrics).
F32_BOUND, BF16_BOUND = 1e-5, 1e-2


# -- the arithmetic ---------------------------------------------------------------------------------
def test_the_gap_sums_absolute_differences_over_real_tokens_of_rows_the_sampler_reported():
    per_token = torch.tensor([[-1.0, -2.0, -3.0, 0.0],
                              [-0.5, 0.0, 0.0, 0.0],
                              [-4.0, -4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]])
    # row 0: |−1+1.5| + 0 + |−3+2| = 1.5; row 1 has no sampler log-probs (left out); row 2: 0.25 + 1 = 1.25
    assert logprob_gap(per_token, mask, [[-1.5, -2.0, -2.0], None, [-4.25, -3.0]]) == (2.75, 5)
    assert logprob_gap(per_token, mask, [None, None, None]) == (0.0, 0)
    with pytest.raises(ValueError, match="row 1: 2 sampler log-probs for 1 response tokens"):
        logprob_gap(per_token, mask, [None, [-1.0, -1.0], None])


def stats_with_gap(total: float, tokens: int) -> UpdateStats:
    empty = torch.zeros(0)
    return UpdateStats(None, empty, empty, None, 0, (total, tokens))


def test_the_step_metric_is_the_mean_over_every_micro_batchs_tokens():
    m = StepMetrics()
    m.add_update(stats_with_gap(2.75, 5))
    m.add_update(stats_with_gap(0.25, 1))
    m.add_update(stats_with_gap(0.0, 0))  # a micro-batch without pairs counts no token
    assert m.record()["logprob_gap"] == pytest.approx(0.5)  # (2.75 + 0.25) / 6, not a mean of means
    assert "logprob_gap" not in StepMetrics().record()  # nothing measured (offline): no value


def test_the_warning_comes_once_above_the_threshold_and_0_turns_it_off():
    watch = GapWatch(0.05)
    assert watch.warning({"step": 1, "logprob_gap": 0.05}) is None  # not above
    assert watch.warning({"step": 2}) is None  # a step without a gap
    message = watch.warning({"step": 3, "logprob_gap": 0.2})
    assert message.startswith("logprob_gap 0.2 > 0.05: the sampler's weights differ from the policy's "
                              "(a missed weight push?) at step 3")
    assert watch.warning({"step": 4, "logprob_gap": 0.3}) is None  # once per run
    assert GapWatch(0.0).warning({"step": 1, "logprob_gap": 5.0}) is None


@pytest.mark.parametrize("overrides, limit", [
    ([], 1e-3),  # float32 policy, transformers sampler
    (["train.logprob_gap_warn=0.5"], 0.5),
    (["train.logprob_gap_warn=0"], 0.0),
    (["train.mixed_precision=bf16"], 0.1),
    (["sampling.backend=vllm"], 1e-3),  # a colocated engine in the policy's float32
    (["sampling.backend=vllm", "vllm.dtype=bfloat16"], 0.1),
    (["sampling.backend=vllm", "vllm.mode=server"], 0.1),  # the server's dtype is whoever started it's
])
def test_the_default_threshold_follows_the_precision_policy_and_sampler_compute_in(overrides, limit):
    from oaif.run.metrics import gap_warn_limit

    cfg = load_config(ROOT / "configs" / "demo.yaml", overrides)
    assert gap_warn_limit(cfg, torch.nn.Linear(2, 2)) == limit  # float32 weights
    if not overrides:
        assert gap_warn_limit(cfg, torch.nn.Linear(2, 2).to(torch.bfloat16)) == 0.1  # bfloat16 weights


# -- the samplers report raw log-probs --------------------------------------------------------------
@pytest.fixture(scope="module")
def sharp_model_dir(tmp_path_factory, smollm2_path) -> str:
    """The tiny random Llama with weights 10x the usual scale: log-probs far from uniform (log 49152)."""
    from helpers import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("sharp_llama"), seed=0, tokenizer_source=smollm2_path,
                           initializer_range=0.2)


@pytest.mark.parametrize("backend", ["shared_prefill", "hf"])
@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.8)])
def test_sampler_logprobs_are_the_raw_logits_log_softmax_of_each_drawn_token(sharp_model_dir, backend, temperature,
                                                                             top_p):
    from oaif.models.load import load_causal_lm
    from oaif.step.sampling import filter_top_p, sample_responses

    model, tok = load_causal_lm(sharp_model_dir)
    prompts = [encode_prompt(tok, p) for p in PROMPTS]
    responses, _, sampled = sample_responses(model, tok, prompts, [0, 1, 2], k=2, seed=3, temperature=temperature,
                                             top_p=top_p, max_new_tokens=10, backend=backend, return_logprobs=True)
    flat, theirs = [r for rs in responses for r in rs], [lp for lps in sampled for lp in lps]
    assert [len(lp) for lp in theirs] == [len(r) for r in flat]
    batch = pack_sequences([p for p in prompts for _ in range(2)], flat, tok.pad_token_id)
    with torch.no_grad():
        per_token = sequence_logprobs(model, batch)[1]  # what the update computes
        ids, mask, pos = batch.joined()
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, batch.prompt_width - 1:-1].float()
    total, n = logprob_gap(per_token, batch.response_mask, theirs)
    assert n == sum(len(r) for r in flat) and total / n < F32_BOUND
    labels = batch.response_ids[..., None]
    raw = logits.log_softmax(-1).gather(-1, labels).squeeze(-1) * batch.response_mask
    processed = filter_top_p(logits / temperature, top_p).log_softmax(-1).gather(-1, labels).squeeze(-1)
    processed = processed.masked_fill(batch.response_mask == 0, 0.0)
    assert logprob_gap(raw, batch.response_mask, theirs)[0] / n < F32_BOUND
    if temperature != 1.0:  # the sampling distribution's log-probs are another thing, which the gap must not see
        assert logprob_gap(processed, batch.response_mask, theirs)[0] / n > 0.05


# -- runs: synchronous bounds, a stale sampler caught -----------------------------------------------
def gap_cfg(model_dir, out, *extra):
    return load_config(ROOT / "configs" / "demo.yaml", [
        f"model.name_or_path={model_dir}", "annotator.type=callable",
        "annotator.callable=oaif.annotators.rules:prefer_shorter", f"train.output_dir={out}", "train.max_steps=3",
        "train.batch_size=4", "sampling.max_new_tokens=12", "optim.lr=1.0e-3", "optim.warmup_steps=0",
        "logging.progress_bar=false", f"data.path={ROOT / 'data/prompts/demo_prompts.jsonl'}", *extra])


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one AcceleratorState per process and refuses another mixed precision in it."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


@pytest.mark.usefixtures("fresh_accelerator_state")
@pytest.mark.parametrize("precision, bound", [("no", F32_BOUND), ("bf16", BF16_BOUND)], ids=["float32", "bf16"])
def test_a_synchronous_run_keeps_the_gap_under_the_precision_bound(sharp_model_dir, tmp_path, capsys, precision,
                                                                   bound):
    from oaif.trainer import train

    train(gap_cfg(sharp_model_dir, tmp_path / "run", f"train.mixed_precision={precision}"))
    gaps = [r["logprob_gap"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert len(gaps) == 3 and all(0 <= g < bound for g in gaps), gaps
    assert "logprob_gap" not in capsys.readouterr().err


def test_a_sampler_that_missed_the_updates_is_caught_and_warned_about(sharp_model_dir, tmp_path, capsys):
    from oaif.generation.live_policy import LivePolicy
    from oaif.models.load import load_causal_lm
    from oaif.trainer import Trainer

    stale, tok = load_causal_lm(sharp_model_dir)  # the starting weights, which no step updates
    Trainer(gap_cfg(sharp_model_dir, tmp_path / "run", "optim.lr=1.0e-2"), sampler=LivePolicy(stale, tok)).setup().train()
    gaps = [r["logprob_gap"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    # step 1 samples the weights it updates (the copy equals the policy); from step 2 on it does not
    assert gaps[0] < F32_BOUND and all(g > 0.1 for g in gaps[1:]), gaps
    warnings = [line for line in capsys.readouterr().err.splitlines() if "logprob_gap" in line]
    assert len(warnings) == 1 and warnings[0].startswith(f"oaif: warning: logprob_gap {gaps[1]:.4g} > 0.001: the "
                                                         "sampler's weights differ from the policy's"), warnings
    assert math.isfinite(gaps[1])
