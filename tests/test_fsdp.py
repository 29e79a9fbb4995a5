"""``train.fsdp``: two gloo processes with FSDP2-sharded models take the same steps as one process.

Every two-process run here shards the policy and the reference for real (``fully_shard`` on gloo, the
same code NCCL runs on GPUs); no part of it is faked. Each comparison states its tolerance.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from helpers import doc_argv, one_line_error
from oaif.run.metrics import read_metrics
from test_distributed import (JUDGES, NOT_COMPARED, ROOT, assert_same_weights, launch, marked,
                              marked_prompts, run)

# docs/scaling.md's FSDP command: the overrides after its config (the launcher is test_distributed's `launch`)
_DOC = doc_argv("accelerate launch --multi_gpu --num_processes 2 -m oaif.cli train configs/demo.yaml train.fsdp=true")
FSDP = _DOC[_DOC.index("configs/demo.yaml") + 1:]
assert FSDP == ["train.fsdp=true"]


def assert_same_metrics(one: list[dict], two: list[dict], rel: float, abs_: float) -> None:
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if not any(part in key for part in NOT_COMPARED):
                assert b[key] == pytest.approx(a[key], rel=rel, abs=abs_), (a["step"], key)


@pytest.mark.slow
def test_full_finetuning_with_accumulation_and_a_rank_without_pairs_matches_one_process(tiny_model_dir, tmp_path):
    # each micro-batch's global batch is [plain, plain, TIE, FAIL]: the second process has no pair (it forwards its
    # responses for kl only), the first two passes a micro-batch (forward_batch_size=1): every collective the
    # first runs, the second must run too (padding passes). Two micro-batches a step: gradients reduced once.
    prompts = marked_prompts(tmp_path / "prompts.jsonl", ["", "", "TIE ", "FAIL "])
    extra = ["train.gradient_accumulation_steps=2", "train.forward_batch_size=1", "train.save_every=1", "optim.scheduler=constant",
             "train.keep_last=0"]
    one, two = tmp_path / "one", tmp_path / "two"
    run(marked(tiny_model_dir, one, prompts, 4, *extra, "train.max_steps=3"), 1)
    run(marked(tiny_model_dir, two, prompts, 2, *extra, *FSDP), 2)
    records = read_metrics(two / "metrics.jsonl")
    assert all(r["masked/tie"] == r["pairs_failed"] == 2 and r["pairs_used"] == 4 for r in records)
    # float32: summed log-probs of the same weights through another reduction order differ by ~1e-5
    assert_same_metrics(read_metrics(one / "metrics.jsonl")[:2], records, rel=1e-4, abs_=3e-5)
    assert_same_weights(one / "checkpoint-2", two / "checkpoint-2", atol=1e-5)
    # the checkpoint is a plain transformers model directory holding the gathered (full) weights
    ckpt = two / "checkpoint-2"
    assert json.loads((ckpt / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    saved = load_file(str(ckpt / "model.safetensors"))
    for name, p in model.state_dict().items():
        assert torch.equal(p, saved.get(name, saved.get("model.embed_tokens.weight"))), name
    # and its optimizer state is the full AdamW state: one process without FSDP continues from it like from its own
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)["optimizer"]["state"]
    assert state[0]["exp_avg"].shape == saved["model.embed_tokens.weight"].shape
    resumed = tmp_path / "resumed"
    run(marked(tiny_model_dir, resumed, prompts, 4, *extra, "train.max_steps=3", f"train.resume={ckpt}",
                "train.resume_allow_changes=[train.batch_size]"), 1)
    assert_same_metrics(read_metrics(one / "metrics.jsonl")[2:], read_metrics(resumed / "metrics.jsonl"),
                        rel=1e-4, abs_=3e-5)
    assert_same_weights(one / "checkpoint-3", resumed / "checkpoint-3", atol=1e-5)


@pytest.mark.slow
def test_lora_with_the_hf_sampler_and_the_policy_as_judge_matches_one_process(tiny_model_dir, tmp_path):
    # sampling (transformers generate) and the self-judge run a number of forwards that differs between the
    # processes: they run on the gathered base; the reference is the same sharded base with the adapter off
    prompts = marked_prompts(tmp_path / "prompts.jsonl", ["", "", "", ""])
    # hard labels: the tiny random judge's P is 0.5 +- 1e-4, so a soft label's gradient (P - sigmoid(beta rho))
    # would be a difference of nearly equal numbers, whose rounding with 2 processes (with or without FSDP) exceeds 1e-4
    extra = ["model.lora.enabled=true", "sampling.backend=hf", "annotator.type=llm", "annotator.model=policy",
             "annotator.max_failure_rate=1.0"]
    run(marked(tiny_model_dir, tmp_path / "one", prompts, 4, *extra), 1)
    run(marked(tiny_model_dir, tmp_path / "two", prompts, 2, *extra, *FSDP), 2)
    one, two = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert two[0]["kl"] == 0.0 and two[0]["logratio_margin"] == 0.0  # step 0: the reference is the policy
    assert all(r["pairs_used"] > 0 for r in two)
    assert_same_metrics(one, two, rel=1e-4, abs_=3e-5)
    assert_same_weights(tmp_path / "one" / "checkpoint-2", tmp_path / "two" / "checkpoint-2", atol=1e-5)


@pytest.mark.slow
def test_bf16_offline_matches_one_process_and_keeps_rho_zero_at_step_zero(tiny_model_dir, tmp_path):
    # FSDP2 computes in bf16 from float32 master weights (MixedPrecisionPolicy); one process uses accelerate's
    # bf16 autocast: the same weights through two bf16 paths (which ops round to bf16 differs), hence 2e-3
    prefs = tmp_path / "prefs.jsonl"
    rows = [{"prompt": f"Question {i}: what is {i} plus {i}?", "chosen": f"{2 * i}.",
             "rejected": f"I think it might be {2 * i + 1}, but I am not sure at all."} for i in range(8)]
    prefs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    extra = ["train.mode=offline", f"data.preference_path={prefs}", "train.mixed_precision=bf16",
             "train.max_steps=2", "data.shuffle=false", "data.eval_fraction=0"]
    run(marked(tiny_model_dir, tmp_path / "one", prefs, 4, *extra), 1)
    run(marked(tiny_model_dir, tmp_path / "two", prefs, 2, *extra, *FSDP), 2)
    one, two = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert two[0]["logratio_margin"] == 0.0 and two[0]["loss"] == pytest.approx(0.6931472, abs=1e-6)
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "logratio_margin", "logps/chosen", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=2e-3, abs=2e-3), (a["step"], key)
    saved = load_file(str(tmp_path / "two" / "checkpoint-2" / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in saved.values())  # the master weights, not the bf16 compute copy


@pytest.mark.slow
def test_a_sigterm_stopped_and_resumed_run_equals_an_uninterrupted_one(tiny_model_dir, tmp_path):
    prompts = marked_prompts(tmp_path / "prompts.jsonl", ["", "", "", ""])
    judge = f"annotator.callable={JUDGES}:signal_after"
    base = [*FSDP, "train.max_steps=4", judge]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    cmd = [*launch(2), "-m", "oaif.cli", "train"]
    done = subprocess.run([*cmd, *marked(tiny_model_dir, whole, prompts, 2, *base)], capture_output=True, text=True,
                          timeout=600, cwd=ROOT, env=dict(env, OAIF_TEST_SIGNAL_AFTER="1000000"))
    assert done.returncode == 0, done.stderr[-3000:]
    # 2 pairs x 2 orders on the main process a step: SIGTERM to the launcher during step 2
    stopped = subprocess.run([*cmd, *marked(tiny_model_dir, cut, prompts, 2, *base)], capture_output=True, text=True,
                             timeout=600, cwd=ROOT, env=dict(env, OAIF_TEST_SIGNAL_AFTER="5", OAIF_TEST_SIGNAL_TO="parent"))
    assert stopped.returncode != 0 and "oaif: stopped by SIGTERM at step" in stopped.stderr, stopped.stderr[-3000:]
    step = int((cut / "latest").read_text().strip().split("-")[1])
    assert 1 <= step < 4
    resumed = subprocess.run([*cmd, *marked(tiny_model_dir, cut, prompts, 2, *base, "train.resume=true")],
                             capture_output=True, text=True, timeout=600, cwd=ROOT,
                             env=dict(env, OAIF_TEST_SIGNAL_AFTER="1000000"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = read_metrics(whole / "metrics.jsonl"), read_metrics(cut / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b, strict=True):
        assert {k: v for k, v in x.items() if not k.startswith("time_") and "_per_s" not in k} == \
               {k: v for k, v in y.items() if not k.startswith("time_") and "_per_s" not in k}
    wa, wb = load_file(str(whole / "checkpoint-4" / "model.safetensors")), load_file(str(cut / "checkpoint-4" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_what_fsdp_cannot_be_combined_with_is_refused_in_one_line(tiny_model_dir, tmp_path, capsys, monkeypatch):
    prompts = marked_prompts(tmp_path / "prompts.jsonl", ["", ""], repeats=2)
    args = ["train", *marked(tiny_model_dir, tmp_path / "run", prompts, 2, *FSDP)]
    line = one_line_error(capsys, [*args, "train.mixed_precision=fp16"])
    assert line.startswith("oaif: error: train.fsdp=true: train.mixed_precision=fp16 is not supported")
    line = one_line_error(capsys, [*args, "loss.reference_mix=0.5"])
    assert line.startswith("oaif: error: train.fsdp=true: a moving reference")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    line = one_line_error(capsys, args)
    assert "train.fsdp=true shards the models itself and cannot run under accelerate's own FSDP" in line
    assert "(ACCELERATE_USE_FSDP)" in line and not (tmp_path / "run").exists()


def test_on_one_process_fsdp_is_a_note_and_changes_nothing(tiny_model_dir, tmp_path):
    prompts = marked_prompts(tmp_path / "prompts.jsonl", ["", ""], repeats=2)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    results = {}
    for name, extra in (("plain", []), ("fsdp", FSDP)):
        args = marked(tiny_model_dir, tmp_path / name, prompts, 2, "train.max_steps=1", *extra)
        results[name] = subprocess.run([sys.executable, "-m", "oaif.cli", "train", *args], capture_output=True,
                                       text=True, timeout=300, cwd=ROOT, env=env)
        assert results[name].returncode == 0, results[name].stderr[-3000:]
    notes = [line for line in results["fsdp"].stderr.splitlines() if line.startswith("oaif: note:")]
    assert notes == ["oaif: note: train.fsdp=true on one process shards nothing"]
    assert "oaif: note:" not in results["plain"].stderr
    wa = load_file(str(tmp_path / "plain" / "checkpoint-1" / "model.safetensors"))
    wb = load_file(str(tmp_path / "fsdp" / "checkpoint-1" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
