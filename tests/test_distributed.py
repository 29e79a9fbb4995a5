"""Two processes (accelerate launch, gloo on CPU) take the same step as one with the same global batch."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from helpers import doc_argv
from oaif.run.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent
ACCELERATE = Path(sys.executable).parent / "accelerate"
# where two processes would share one GPU, the tests compare them on the CPU; elsewhere they run
# docs/scaling.md's command as printed, with the default train.device=auto
DEVICE = ["train.device=cpu"] if torch.cuda.is_available() else []


def launch(procs: int) -> list[str]:
    """docs/scaling.md's launcher up to ``-m``: on a CPU-only machine accelerate starts several processes with
    --multi_gpu (gloo)."""
    argv = doc_argv("accelerate launch --multi_gpu --num_processes 2 -m oaif.cli train configs/demo.yaml")
    launcher = argv[1:argv.index("-m")]
    launcher[launcher.index("--num_processes") + 1] = str(procs)
    return [str(ACCELERATE), *launcher]


def run(args: list[str], procs: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    if procs == 1:
        cmd = [sys.executable, "-m", "oaif.cli", "train", *args]
    else:
        cmd = [*launch(procs), "-m", "oaif.cli", "train", *args]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def common(model_dir, out, batch_size):
    return [str(ROOT / "configs" / "demo.yaml"), f"model.name_or_path={model_dir}", f"train.output_dir={out}",
            f"train.batch_size={batch_size}", "train.max_steps=3", "optim.lr=1.0e-3", "optim.warmup_steps=0",
            "logging.progress_bar=false", "sampling.max_new_tokens=10", *DEVICE]


def assert_same_weights(a: Path, b: Path, atol: float, file: str = "model.safetensors") -> None:
    wa, wb = load_file(str(a / file)), load_file(str(b / file))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=0, msg=k)


@pytest.mark.slow
def test_offline_two_processes_match_one(tiny_model_dir, tmp_path):
    prefs = tmp_path / "prefs.jsonl"
    rows = [{"prompt": f"Question {i}: what is {i} plus {i}?", "chosen": f"{2 * i}.",
             "rejected": f"I think it might be {2 * i + 1}, but I am not sure at all."} for i in range(12)]
    prefs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    extra = ["train.mode=offline", f"data.preference_path={prefs}"]
    run(common(tiny_model_dir, tmp_path / "one", 4) + extra, 1)
    run(common(tiny_model_dir, tmp_path / "two", 2) + extra, 2)
    assert_same_weights(tmp_path / "one" / "checkpoint-3", tmp_path / "two" / "checkpoint-3", atol=1e-5)
    one, two = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    for a, b in zip(one, two):
        assert a["pairs_used"] == b["pairs_used"] == 4
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)


@pytest.mark.slow
def test_online_two_processes_run_the_loop_and_match_one(tiny_model_dir, tmp_path):
    extra = ["annotator.type=callable", "annotator.callable=oaif.annotators.rules:prefer_shorter"]
    run(common(tiny_model_dir, tmp_path / "one", 4) + extra, 1)
    run(common(tiny_model_dir, tmp_path / "two", 2) + extra, 2)
    one, two = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in two] == [1, 2, 3]
    # samples are seeded per prompt, not per process, so both runs see the same pairs
    for a, b in zip(one, two):
        assert a["pairs_judged"] == b["pairs_judged"] and a["pairs_used"] == b["pairs_used"]
        assert a["response_length"] == pytest.approx(b["response_length"])
        assert a["prompts_seen"] == b["prompts_seen"] == 4 * a["step"]
        assert 0 <= b["logprob_gap"] < 1e-5  # every process's tokens, each sampling the policy (float32 rounding)
    assert_same_weights(tmp_path / "one" / "checkpoint-3", tmp_path / "two" / "checkpoint-3", atol=1e-4)
    assert len((tmp_path / "two" / "annotations.jsonl").read_text().splitlines()) > 0


@pytest.mark.slow
def test_the_judge_noise_warning_counts_every_process_and_comes_from_the_main_one(tiny_model_dir, tmp_path):
    # 2 processes x 2 prompts: 4 pairs a step, 2 of them on each process. An 8-pair window fills at step 2
    # only with both processes' pairs (each alone judges 6 in 3 steps); the warning is printed once.
    judge = f"annotator.callable={JUDGES}:first_shown_mostly"
    result = run(common(tiny_model_dir, tmp_path / "two", 2) + ["annotator.type=callable", judge,
                                                                "annotator.noise_window=8"], 2)
    warnings = [line for line in result.stderr.splitlines() if line.startswith("oaif: warning: the judge's labels")]
    assert len(warnings) == 1, result.stderr[-3000:]
    assert "both-order consistency 0.000 (noise under 0.5)" in warnings[0]
    records = read_metrics(tmp_path / "two" / "metrics.jsonl")
    judged = [r["pairs_judged"] - r["pairs_failed"] for r in records]
    assert sum(judged[:2]) >= 8 > sum(judged) / 2, judged
    assert f"over {sum(judged[:2])} judged pairs (annotator.noise_window=8)" in warnings[0]
    summary = [line for line in result.stdout.splitlines() if line.startswith("judge: ")]
    assert len(summary) == 1 and summary[0].endswith("no better than coin flips; use a stronger judge (docs/judges.md, \"Which judge runs "
                                           "here?\") or a rule or reward model (annotator.type=callable or reward_model)")


@pytest.mark.slow
def test_simpo_two_processes_match_one(tiny_model_dir, tmp_path):
    # the reference-free loss: no reference forward and no kl on any process, response lengths from each
    # process's own rollouts; the step is still the mean over the global batch's pairs
    extra = ["annotator.type=callable", "annotator.callable=oaif.annotators.rules:prefer_shorter",
             "loss.type=simpo", "train.max_steps=2"]
    run(common(tiny_model_dir, tmp_path / "one", 4) + extra, 1)
    run(common(tiny_model_dir, tmp_path / "two", 2) + extra, 2)
    one, two = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in two] == [1, 2]
    for a, b in zip(one, two):
        assert a["pairs_used"] == b["pairs_used"] > 0 and "kl" not in a and "kl" not in b
        for key in ("loss", "logratio_margin", "rewards/chosen", "reward_accuracy"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    assert_same_weights(tmp_path / "one" / "checkpoint-2", tmp_path / "two" / "checkpoint-2", atol=1e-4)


@pytest.mark.slow
def test_a_moving_reference_on_two_processes_matches_one(tiny_model_dir, tmp_path):
    # TR-DPO's soft update after every step: each process moves its copy of the reference alike, the main
    # process saves it, and the next step's rho and kl are measured against it on every process
    extra = ["annotator.type=callable", "annotator.callable=oaif.annotators.rules:prefer_shorter",
             "loss.reference_mix=0.5"]
    run(common(tiny_model_dir, tmp_path / "one", 4) + extra, 1)
    run(common(tiny_model_dir, tmp_path / "two", 2) + extra, 2)
    one, two = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in two] == [1, 2, 3] and two[0]["kl"] == 0.0 and two[1]["kl"] != 0.0
    for a, b in zip(one, two):
        assert a["pairs_used"] == b["pairs_used"] > 0
        for key in ("loss", "logratio_margin", "kl"):  # differences of summed log-probs: float32 noise ~1e-5
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=2e-5), key
    assert_same_weights(tmp_path / "one" / "checkpoint-3", tmp_path / "two" / "checkpoint-3", atol=1e-4)
    assert_same_weights(tmp_path / "one" / "checkpoint-3" / "reference", tmp_path / "two" / "checkpoint-3" / "reference",
                        atol=1e-4, file="weights.safetensors")


JUDGES = Path(__file__).resolve().parent / "judges_for_tests.py"


def marked_prompts(path: Path, marks: list[str], repeats: int = 6) -> Path:
    """A prompt file read in order (data.shuffle=false): ``marks`` repeated; a TIE or FAIL mark makes
    :mod:`judges_for_tests` tie or fail every pair of that prompt."""
    rows = [{"id": f"p{i}-{j}", "prompt": f"{mark}Question {i}.{j}: name something that is {i + j} metres long."}
            for i in range(repeats) for j, mark in enumerate(marks)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def marked(model_dir, out, prompts, batch_size, *extra):
    return common(model_dir, out, batch_size) + [
        f"data.path={prompts}", "data.shuffle=false", "data.eval_fraction=0", "annotator.type=callable",
        f"annotator.callable={JUDGES}:shorter_unless_marked", "train.max_steps=2", *extra]


def audit_lines(run: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run / "annotations.jsonl").read_text().splitlines()]
    for line in lines:
        line.pop("latency_s")
    return lines


NOT_COMPARED = ("time_", "_per_s")


@pytest.mark.slow
def test_a_process_without_usable_pairs_matches_one_process(tiny_model_dir, tmp_path):
    # each step's global batch is [plain, plain, TIE, FAIL]: the second process has only a tie and a failure,
    # so it has no loss, no margin, no successful judgment, nothing to back-propagate
    prompts = marked_prompts(tmp_path / "prompts.jsonl", ["", "", "TIE ", "FAIL "])
    run(marked(tiny_model_dir, tmp_path / "one", prompts, 4), 1)
    run(marked(tiny_model_dir, tmp_path / "two", prompts, 2), 2)
    one, two = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in two] == [1, 2]
    for a, b in zip(one, two):
        assert a["masked/tie"] == a["pairs_failed"] == a["failed/nan"] == 1 and a["pairs_used"] == 2
        assert a.keys() == b.keys()
        for key in a:
            if not any(part in key for part in NOT_COMPARED):
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key
    assert_same_weights(tmp_path / "one" / "checkpoint-2", tmp_path / "two" / "checkpoint-2", atol=1e-5)
    # the audit log holds every judgment of both processes once, in the one-process order
    lines = audit_lines(tmp_path / "two")
    assert len(lines) == sum(r["pairs_judged"] for r in two) == 8
    assert lines == audit_lines(tmp_path / "one")
    assert sum(line["failure"] == "nan" for line in lines) == 2


@pytest.mark.slow
def test_best_worst_pairs_on_two_processes_match_one(tiny_model_dir, tmp_path):
    # K=4, every pair judged; the second process's prompts are one whose comparisons all tie and one whose
    # comparisons all fail: both rankings undetermined, so it has no pair but its judged comparisons
    prompts = marked_prompts(tmp_path / "prompts.jsonl", ["", "", "TIE ", "FAIL "])
    extra = ["sampling.num_samples=4", "sampling.pairing=best_worst", "loss.soft_labels=true"]
    run(marked(tiny_model_dir, tmp_path / "one", prompts, 4, *extra), 1)
    run(marked(tiny_model_dir, tmp_path / "two", prompts, 2, *extra), 2)
    one, two = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    for a, b in zip(one, two, strict=True):
        assert a["masked/undetermined_failed"] == 1 and a["pairs_judged"] + a["masked/identical"] == 24
        assert a["pairs_used"] >= 1 and a.keys() == b.keys()
        for key in a:
            if not any(part in key for part in NOT_COMPARED):
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key
    assert_same_weights(tmp_path / "one" / "checkpoint-2", tmp_path / "two" / "checkpoint-2", atol=1e-5)
    lines = audit_lines(tmp_path / "two")  # one line per judged comparison, in the one-process order
    assert len(lines) == sum(r["pairs_judged"] for r in two) and lines == audit_lines(tmp_path / "one")


@pytest.mark.slow
def test_accumulation_with_an_empty_micro_batch_keeps_processes_identical(tiny_model_dir, tmp_path):
    # per step: micro-batch 1 is four plain prompts, micro-batch 2 has no usable pair on any process
    prompts = marked_prompts(tmp_path / "prompts.jsonl", ["", "", "", "", "TIE ", "FAIL ", "TIE ", "FAIL "])
    extra = ["train.gradient_accumulation_steps=2"]
    run(marked(tiny_model_dir, tmp_path / "one", prompts, 4, *extra), 1)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [*launch(2), str(Path(__file__).parent / "train_and_dump_ranks.py"), *marked(tiny_model_dir, tmp_path / "two", prompts, 2, *extra)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / "two" / f"rank-{i}.pt") for i in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), "the processes' parameters diverged"
    assert_same_weights(tmp_path / "one" / "checkpoint-2", tmp_path / "two" / "checkpoint-2", atol=1e-5)
    one = read_metrics(tmp_path / "one" / "metrics.jsonl")
    # micro-batch 2 (TIE, FAIL) gives 2 ties and 2 failures; micro-batch 1's four pairs are used unless the
    # judge calls two equally long samples a tie or they came out identical (tiny model, 10 tokens)
    assert all(r["pairs_failed"] == 2 and r["masked/tie"] >= 2 and r["pairs_used"] >= 1
               and r["pairs_used"] + r["pairs_masked"] + r["pairs_failed"] == 8 for r in one)


@pytest.mark.slow
def test_one_process_failing_does_not_deadlock_the_error_save(tiny_model_dir, tmp_path):
    # the main process raises during step 2 (after 4 judge calls: 2 pairs x 2 orders) while the other
    # goes on to the step's collective calls; the main process must save step 1 without waiting for it
    prompts = marked_prompts(tmp_path / "prompts.jsonl", ["", "", "", ""])
    out = tmp_path / "two"
    args = marked(tiny_model_dir, out, prompts, 2, f"annotator.callable={JUDGES}:interrupt_main_process",
                  "train.max_steps=5")
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", OAIF_TEST_INTERRUPT_AFTER="4")
    cmd = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "oaif.cli", "train", *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        _, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        import psutil  # an accelerate dependency

        for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
            p.kill()  # the launcher and the processes it started (they run in sessions of their own)
        proc.communicate()
        raise AssertionError("the processes deadlocked after one of them failed") from None
    assert proc.returncode != 0, stderr[-3000:]
    assert (out / "latest").read_text().strip() == "checkpoint-1"
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1]
    AutoModelForCausalLM.from_pretrained(out / "checkpoint-1")


def test_processes_launched_together_that_would_each_run_alone_are_refused():
    # what train.device=auto did on a CPU-only machine: accelerate, not told cpu, makes each launched process a
    # lone run (no distributed backend), and every one of them takes the main process's part and run directory
    code = ("import torch; from accelerate import Accelerator; from oaif.run.build import check_process_group, on_cpu\n"
            "assert on_cpu('auto') != torch.cuda.is_available() and on_cpu('cpu') and not on_cpu('cuda')\n"
            "check_process_group(Accelerator(cpu=False), 'auto')")
    env = dict(os.environ, WORLD_SIZE="2", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0, result.stderr[-3000:]
    assert re.search(r"ConfigError: train.device=auto: the launcher started 2 processes, but on \w+ each runs alone",
                     result.stderr), result.stderr[-3000:]


@pytest.mark.slow
def test_self_judging_two_processes_match_one(tiny_model_dir, tmp_path):
    # annotator.model=policy: each process judges its own pairs with its own copy of the policy. The second
    # process's prompts make judge prompts over annotator.max_length (failed as too_long), so it runs no judge
    # forward while the first runs several: a judge that went through DDP's forward (which broadcasts buffers)
    # would leave the processes in different collective calls
    long = "Think it over slowly. " * 25
    prompts = marked_prompts(tmp_path / "prompts.jsonl", ["", "", long, long])
    extra = ["annotator.type=llm", "annotator.model=policy", "annotator.max_length=260",
             "annotator.max_failure_rate=1.0", "loss.soft_labels=true"]
    run(marked(tiny_model_dir, tmp_path / "one", prompts, 4, *extra), 1)
    run(marked(tiny_model_dir, tmp_path / "two", prompts, 2, *extra), 2)
    one, two = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in two] == [1, 2]
    for a, b in zip(one, two, strict=True):
        assert a["failed/too_long"] == 2 and a["pairs_used"] >= 1 and a.keys() == b.keys()
        for key in a:
            if not any(part in key for part in NOT_COMPARED):
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key
    assert_same_weights(tmp_path / "one" / "checkpoint-2", tmp_path / "two" / "checkpoint-2", atol=1e-5)
    lines_one, lines_two = audit_lines(tmp_path / "one"), audit_lines(tmp_path / "two")
    assert len(lines_two) == len(lines_one) == 8 and all(line["judge"] == "llm:policy:helpful" for line in lines_two)
    for a, b in zip(lines_one, lines_two):  # step 2 is judged by the policy after step 1, on each process
        assert (a["failure"], a["prompt_id"]) == (b["failure"], b["prompt_id"])
        assert (a["prob"] is None and b["prob"] is None) or b["prob"] == pytest.approx(a["prob"], abs=1e-5)


@pytest.mark.slow
def test_async_steps_two_processes_match_one(tiny_model_dir, tmp_path):
    # each process's worker samples its own prompts from its own copy of the policy; every collective call
    # (the pair count, the metrics, the audit log, the queued batches a checkpoint keeps) stays in the main thread
    extra = ["annotator.type=callable", "annotator.callable=oaif.annotators.rules:prefer_shorter",
             "train.async_steps=1", "train.save_every=2", "train.keep_last=0"]
    run(common(tiny_model_dir, tmp_path / "one", 4) + extra, 1)
    run(common(tiny_model_dir, tmp_path / "two", 2) + extra, 2)
    one, two = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert [r["policy_lag"] for r in two] == [r["policy_lag"] for r in one] == [0, 1, 1]
    for a, b in zip(one, two, strict=True):
        assert a["pairs_judged"] == b["pairs_judged"] and a["pairs_used"] == b["pairs_used"]
        assert a["response_length"] == pytest.approx(b["response_length"])
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["prompts_seen"] == b["prompts_seen"] == 4 * a["step"]

    def audit(run):
        return [{k: v for k, v in json.loads(line).items() if k != "latency_s"}
                for line in (run / "annotations.jsonl").read_text().splitlines()]

    assert audit(tmp_path / "two") == audit(tmp_path / "one")
    assert_same_weights(tmp_path / "one" / "checkpoint-3", tmp_path / "two" / "checkpoint-3", atol=1e-4)
    # checkpoint-2 keeps step 3's queued batch of each process, drawn from the same global stream position
    saved = torch.load(tmp_path / "two" / "checkpoint-2" / "trainer_state.pt", weights_only=True)["async"]
    assert saved["num_processes"] == 2 and [len(r) for r in saved["ranks"]] == [1, 1]
    assert saved["stream_after"]["position"] == 12
    positions = [m["rollouts"]["positions"] for r in saved["ranks"] for m in r[0]]
    assert sorted(p for ps in positions for p in ps) == list(range(8, 12))
