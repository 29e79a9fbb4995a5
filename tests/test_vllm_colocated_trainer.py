"""The trainer with a colocated vLLM engine: every push path hands the engine the policy it trains.

Needs vLLM importable in this interpreter: it runs in the vLLM virtual environment
(``test_vllm_venv.py`` starts it there from the main suite). The session's engine
(``vllm_engine`` in conftest.py) is given to each trainer (``Trainer(cfg, sampler=engine)``),
which pushes its own policy into it at setup, so the tests do not depend on each other's
leftovers. The engine built from a config (``sampling.backend=vllm``) runs in
``test_configs_run.py``'s run of ``configs/vllm_demo.yaml``.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

from oaif.config import load_config  # noqa: E402
from oaif.generation.weights import policy_weights  # noqa: E402
from oaif.models.chat import encode_prompt  # noqa: E402
from oaif.models.load import load_causal_lm  # noqa: E402
from oaif.run.metrics import read_metrics  # noqa: E402
from oaif.trainer import Trainer, train  # noqa: E402
from vllm_helpers import PROMPTS, ROOT, greedy_both, train_overrides  # noqa: E402

DEMO = ROOT / "configs" / "demo.yaml"


@pytest.fixture
def tiny(vllm_tiny):
    return vllm_tiny


@pytest.fixture
def engine(vllm_engine):
    return vllm_engine


def greedy(trainer, engine):
    """Greedy responses to :data:`PROMPTS` of the transformers backend on the trainer's policy, and of the engine."""
    prompts = [encode_prompt(trainer.tokenizer, p) for p in PROMPTS]
    return greedy_both(trainer.unwrapped, trainer.tokenizer, engine, prompts)


def changed(model, start_dir) -> bool:
    start = load_causal_lm(start_dir)[0].state_dict()
    return any(not torch.equal(v, start[k]) for k, v in model.state_dict().items() if k in start)


@pytest.mark.gpu
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_trainer_step_pushes_the_updated_policy_into_the_engine(tiny, engine, tmp_path, lora, train_device):
    # a large learning rate, so that one step changes the greedy responses
    extra = ["model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=8", "optim.lr=5.0e-2"] if lora \
        else ["optim.lr=1.0e-2"]
    t = Trainer(load_config(DEMO, train_overrides(tiny.first, tmp_path / "run", *extra, f"train.device={train_device}")),
                sampler=engine).setup()
    hf_before, vl_before = greedy(t, engine)
    assert vl_before == hf_before
    record = t.run_step()  # sample from the engine, judge, update, push
    assert record["pairs_used"] > 0 and record["time_weight_sync_s"] > 0
    if lora:
        assert any(torch.count_nonzero(p) for n, p in t.unwrapped.named_parameters() if "lora_B" in n)
    else:
        assert changed(t.unwrapped, tiny.first)
    hf_after, vl_after = greedy(t, engine)
    assert vl_after == hf_after  # the engine samples the updated policy (LoRA: the adapter merged in)
    assert vl_after[0] != vl_before[0]  # which the step changed


def test_a_resumed_run_pushes_the_resumed_weights_before_its_first_sample(tiny, engine, tmp_path):
    out = tmp_path / "run"
    train(load_config(DEMO, train_overrides(tiny.first, out, "sampling.backend=shared_prefill", "train.max_steps=1",
                                            "optim.lr=1.0e-2")))
    model, tok = load_causal_lm(tiny.first)
    engine.load_weights(policy_weights(model))  # the engine holds the starting policy
    start = greedy_both(model, tok, engine, [encode_prompt(tok, p) for p in PROMPTS])[1]
    t = Trainer(load_config(DEMO, train_overrides(tiny.first, out, f"train.resume={out / 'checkpoint-1'}",
                                                  "train.max_steps=2", "optim.lr=1.0e-2",
                                                  # the first run sampled with transformers, this one with vLLM
                                                  "train.resume_allow_changes=[sampling.backend]")),
                sampler=engine).setup()
    assert t.step == 1 and changed(t.unwrapped, tiny.first)
    hf, vl = greedy(t, engine)
    assert vl == hf and vl[0] != start[0]
    assert t.train()["steps"] == 2  # the engine stays open after train(): the test owns it
    hf, vl = greedy(t, engine)
    assert vl == hf


class SkipsOnePush:
    """The engine, except that push number ``skip`` (1: the one at setup, 2: after the first step) is lost,
    as a weight sync that failed silently would lose it."""

    def __init__(self, engine, skip: int):
        self.engine, self.skip, self.pushes = engine, skip, 0

    def sample(self, *args, **kwargs):
        return self.engine.sample(*args, **kwargs)

    def load_weights(self, weights) -> None:
        self.pushes += 1
        if self.pushes != self.skip:
            self.engine.load_weights(weights)

    def close(self) -> None:
        """The test owns the engine."""


#: vLLM's float32 CPU kernels against transformers' on the same weights: measured at most 1.5e-6 (3 steps)
VLLM_F32_BOUND = 1e-4


@pytest.mark.parametrize("skip", [0, 2], ids=["every_push", "missed_push"])
def test_the_logprob_gap_catches_an_engine_that_missed_a_push(tiny, engine, tmp_path, capsys, skip):
    # a large learning rate, so that one step moves the log-probs far beyond the bound
    wrapped = SkipsOnePush(engine, skip)
    Trainer(load_config(DEMO, train_overrides(tiny.first, tmp_path / "run", "optim.lr=1.0e-2")),
            sampler=wrapped).setup().train()
    assert wrapped.pushes == 4  # setup and after each of the 3 steps
    gaps = [r["logprob_gap"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    warnings = [line for line in capsys.readouterr().err.splitlines() if "logprob_gap" in line]
    if not skip:
        assert all(g < VLLM_F32_BOUND for g in gaps) and not warnings, (gaps, warnings)
        return
    # step 2 samples the starting weights but updates step 1's; the push after step 2 arrives again
    assert gaps[0] < VLLM_F32_BOUND and gaps[1] > 0.1 and gaps[2] < VLLM_F32_BOUND, gaps
    assert len(warnings) == 1 and warnings[0].startswith(f"oaif: warning: logprob_gap {gaps[1]:.4g} > 0.001: the "
                                                         "sampler's weights differ from the policy's"), warnings
def test_async_steps_sample_from_the_engine_one_step_behind_and_leave_it_with_the_last_weights(tiny, engine, tmp_path):
    import json

    from oaif.run.metrics import read_metrics

    out = tmp_path / "run"
    t = Trainer(load_config(DEMO, train_overrides(tiny.first, out, "train.async_steps=1", "optim.lr=1.0e-2")),
                sampler=engine).setup()
    assert t.train()["steps"] == 3  # the worker sampled from the engine and pushed into it, in its own thread
    records = read_metrics(out / "metrics.jsonl")
    assert [r["policy_lag"] for r in records] == [0, 1, 1] and all(r["pairs_failed"] == 0 for r in records)
    versions = {(a["step"], a["policy_version"]) for a in map(json.loads, (out / "annotations.jsonl").open())}
    assert sorted(versions) == [(1, 0), (2, 0), (3, 1)]
    assert changed(t.unwrapped, tiny.first)
    hf, vl = greedy(t, engine)
    assert vl == hf  # the last step's push was waited for: the engine holds the final policy


def test_async_steps_with_an_engine_built_after_torch_set_num_threads(tiny, tmp_path):
    # The worker thread starts with OpenMP's default thread count; the main thread set 1 before the engine
    # started. vLLM's CPU attention then aborted the whole process ("Check failed: ... thread_num (2 vs. 1)"),
    # so the run is a child process here. Needs at least two cores to differ from the default.
    import os
    import subprocess
    import sys

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one core: OpenMP's default is already 1 thread")
    out = tmp_path / "run"
    code = ("import sys, torch; torch.set_num_threads(1)\n"
            "from oaif.config import load_config\nfrom oaif.trainer import train\n"
            "print(train(load_config(sys.argv[1], sys.argv[2:]))['steps'])")
    argv = [str(DEMO), *train_overrides(tiny.first, out, "train.async_steps=1", "train.max_steps=2")]
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "2"
    assert [r["policy_lag"] for r in read_metrics(out / "metrics.jsonl")] == [0, 1]
