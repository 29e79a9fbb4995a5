"""A run's life around the loop: stop signals, the run-directory lock, startup checks that leave an old
run untouched, overwriting, non-finite training, what a resume may change, the failure stop.

Real processes, real signals, real files, the tiny random Llama and rule judges
(``tests/judges_for_tests.py``); nothing here is mocked.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from oaif.config import load_config
from oaif.errors import AnnotatorError, CheckpointError, ConfigError, OaifError, TrainingError
from oaif.run.metrics import read_metrics
from oaif.trainer import train

ROOT = Path(__file__).resolve().parent.parent
JUDGES = Path(__file__).resolve().parent / "judges_for_tests.py"
ACCELERATE = Path(sys.executable).parent / "accelerate"
PROMPTS = ROOT / "data/prompts/demo_prompts.jsonl"


def args(model_dir, out, *extra) -> list[str]:
    return [str(ROOT / "configs" / "demo.yaml"), f"model.name_or_path={model_dir}", "annotator.type=callable",
            f"annotator.callable={JUDGES}:shorter_unless_marked", f"train.output_dir={out}", "train.max_steps=3",
            "train.batch_size=2", "sampling.max_new_tokens=8", "optim.lr=1.0e-3", "optim.warmup_steps=0",
            "logging.progress_bar=false", f"data.path={PROMPTS}", "train.device=cpu", *extra]


def cfg(model_dir, out, *extra):
    return load_config(args(model_dir, out, *extra)[0], args(model_dir, out, *extra)[1:])


def env(**extra) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **extra)


def cli(argv: list[str], **extra_env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "oaif.cli", "train", *argv], env=env(**extra_env),
                          capture_output=True, text=True, timeout=600, cwd=ROOT)


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("oaif: ")]


def steps(out: Path) -> list[int]:
    return [r["step"] for r in read_metrics(out / "metrics.jsonl")]


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- stop signals

def test_sigterm_saves_a_resumable_checkpoint_even_without_save_every(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    # 2 pairs x 2 orders = 4 judge calls a step: the signal arrives during step 2 (train.save_every=0)
    first = cli(args(tiny_model_dir, out, f"annotator.callable={JUDGES}:signal_after", "train.max_steps=4",
                     "train.save_every=0"), OAIF_TEST_SIGNAL_AFTER="5")
    assert first.returncode == 128 + 15, first.stderr[-3000:]
    assert errors(first.stderr) == [f"oaif: stopped by SIGTERM at step 2; saved {out / 'checkpoint-2'}, rerun with "
                                    f"train.resume=true to continue"]
    assert "Traceback" not in first.stderr
    assert (out / "latest").read_text().strip() == "checkpoint-2" and steps(out) == [1, 2]
    second = cli(args(tiny_model_dir, out, f"annotator.callable={JUDGES}:signal_after", "train.max_steps=4",
                      "train.resume=true"), OAIF_TEST_SIGNAL_AFTER="1000000")
    assert second.returncode == 0, second.stderr[-3000:]
    assert steps(out) == [1, 2, 3, 4] and (out / "latest").read_text().strip() == "checkpoint-4"


def test_sigterm_during_setup_is_one_line_and_writes_nothing(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    judge = Path(__file__).resolve().parent / "signal_during_setup.py"
    run = cli(args(tiny_model_dir, out, f"annotator.callable={judge}:judge"))
    assert run.returncode == 128 + 15 and errors(run.stderr) == ["oaif: stopped by SIGTERM"], run.stderr[-3000:]
    assert "Traceback" not in run.stderr and not out.exists()


def test_a_second_sigterm_stops_at_once_through_a_judge_that_catches_exceptions(tiny_model_dir, tmp_path):
    out, gate = tmp_path / "run", tmp_path / "gate"  # the gate never opens: step 2 waits in the judge
    proc = subprocess.Popen([sys.executable, "-m", "oaif.cli", "train",
                             *args(tiny_model_dir, out, f"annotator.callable={JUDGES}:gated", "train.max_steps=4")],
                            env=env(OAIF_TEST_GATE=str(gate), OAIF_TEST_GATE_AFTER="4"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.time() + 300
    while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text()) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    try:
        _, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError("the second SIGTERM did not stop the run at once") from None
    assert proc.returncode == 128 + 15 and errors(stderr) == ["oaif: stopped by SIGTERM"], stderr[-3000:]
    assert (out / "latest").read_text().strip() == "checkpoint-1"  # the progress before the unfinished step


@pytest.mark.slow
def test_sigterm_to_the_launcher_stops_two_processes_together_with_a_checkpoint(tiny_model_dir, tmp_path):
    out = tmp_path / "two"
    # docs/scaling.md's command (test_distributed.py claims it), with the default train.device=auto (cpu where two processes would share a GPU)
    device = "cpu" if torch.cuda.is_available() else "auto"
    cmd = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "-m", "oaif.cli", "train",
           *args(tiny_model_dir, out, f"annotator.callable={JUDGES}:signal_after", "train.max_steps=6",
                 "data.shuffle=false", f"train.device={device}")]
    proc = subprocess.Popen(cmd, env=env(OAIF_TEST_SIGNAL_AFTER="5", OAIF_TEST_SIGNAL_TO="parent"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        _, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        import psutil  # an accelerate dependency

        for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
            p.kill()
        proc.communicate()
        raise AssertionError("the processes deadlocked after SIGTERM") from None
    assert proc.returncode != 0
    # each process's last line; searched, not split by line, so the test does not rest on how two writers interleave
    stops = re.findall(r"oaif: stopped by SIGTERM at step \d+", stderr)
    # both processes stop after the same step: the one the signal arrived in (2), or the next if it came late
    assert len(stops) == 2 and stops[0] == stops[1], stderr[-3000:]
    step = int(stops[0].rsplit(" ", 1)[1])
    assert step in (2, 3) and (out / "latest").read_text().strip() == f"checkpoint-{step}"
    assert steps(out) == list(range(1, step + 1))
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / f"checkpoint-{step}")


# --------------------------------------------------------------------------- the run-directory lock

def test_a_second_run_into_the_same_directory_is_refused_and_the_first_finishes_intact(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "oaif.cli", "train",
                              *args(tiny_model_dir, out, f"annotator.callable={JUDGES}:gated", "train.max_steps=8",
                                    "train.save_every=2")],
                             env=env(OAIF_TEST_GATE=str(tmp_path / "gate"), OAIF_TEST_GATE_AFTER="4"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.time() + 300
    while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text()) and time.time() < deadline:
        assert first.poll() is None, first.communicate()[1][-3000:]
        time.sleep(0.2)
    # the most destructive second run: a fresh one that would delete the directory's run
    second = cli(args(tiny_model_dir, out, "train.overwrite_output_dir=true", "train.max_steps=2"))
    (tmp_path / "gate").touch()  # the first run waits in step 2 until the second has finished
    _, first_err = first.communicate(timeout=600)
    assert second.returncode == 2, second.stderr[-3000:]
    [line] = errors(second.stderr)
    assert f"is in use by another run (pid {first.pid} on " in line and "started 20" in line
    assert first.returncode == 0, first_err[-3000:]
    assert steps(out) == list(range(1, 9)) and (out / "latest").read_text().strip() == "checkpoint-8"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-8"]


def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path):
    from oaif.run.lock import LOCK_FILE, RunLock

    code = (f"import os, signal; from oaif.run.lock import RunLock; lock = RunLock({str(tmp_path)!r}).acquire(); "
            "os.kill(os.getpid(), signal.SIGKILL)")
    killed = subprocess.run([sys.executable, "-c", code], env=env(), timeout=60)
    assert killed.returncode == -9 and (tmp_path / LOCK_FILE).is_file()
    with RunLock(tmp_path):  # flock went away with the process
        pass


def test_a_held_lock_names_its_holder(tmp_path):
    from oaif.run.lock import RunLock

    code = (f"import sys, time; from oaif.run.lock import RunLock; lock = RunLock({str(tmp_path)!r}).acquire(); "
            "print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], env=env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CheckpointError, match=rf"in use by another run \(pid {holder.pid} on .*, started "):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    with RunLock(tmp_path):
        pass


# --------------------------------------------------------------------------- failed startups, overwriting

def test_a_rerun_that_fails_at_startup_leaves_the_old_run_byte_identical(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    train(cfg(tiny_model_dir, out, "train.max_steps=2", "train.save_every=1"))
    before = tree_hashes(out)
    assert "metrics.jsonl" in before and "checkpoint-2/model.safetensors" in before
    (tmp_path / "bad.jsonl").write_text('{"text": "no prompt column"}\n')
    failing = [
        ("train.max_steps=3",),  # a fresh run where a run is
        ("train.resume=true", "loss.type=ipo"),  # another experiment
        ("train.overwrite_output_dir=true", f"model.name_or_path={tmp_path / 'missing-model'}"),
        ("train.overwrite_output_dir=true", f"data.path={tmp_path / 'bad.jsonl'}"),
        ("train.resume=true", f"data.path={tmp_path / 'bad.jsonl'}"),
        ("train.overwrite_output_dir=true", "train.mixed_precision=fp16"),
        ("train.resume=true", f"annotator.callable={JUDGES}:no_such_judge"),
        ("train.resume=true", "train.overwrite_output_dir=true"),  # would delete what it resumes
        (f"train.resume={out / 'checkpoint-1'}", "train.overwrite_output_dir=true"),
    ]
    for extra in failing:
        with pytest.raises(OaifError):
            train(cfg(tiny_model_dir, out, *extra))
        assert tree_hashes(out) == before, extra


def test_overwrite_output_dir_replaces_the_old_run_so_eval_sees_only_the_new_one(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    train(cfg(tiny_model_dir, out, "train.max_steps=3", "train.save_every=1", "train.keep_last=0"))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    with pytest.raises(ConfigError, match=r"holds an earlier run \(checkpoint-1.*train.overwrite_output_dir=true"):
        train(cfg(tiny_model_dir, out, "train.max_steps=1"))
    (out / "notes.txt").write_text("mine")
    train(cfg(tiny_model_dir, out, "train.max_steps=1", "train.overwrite_output_dir=true"))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"] and steps(out) == [1]
    assert (out / "notes.txt").read_text() == "mine"
    from oaif.evaluation.evaluate import discover_checkpoints

    assert [p.name for _, p in discover_checkpoints(out)] == ["checkpoint-1"]


def test_resume_without_a_checkpoint_keeps_an_earlier_runs_logs(tiny_model_dir, tmp_path):
    import shutil

    out = tmp_path / "run"
    train(cfg(tiny_model_dir, out, "train.max_steps=2", "train.save_every=0"))
    shutil.rmtree(out / "checkpoint-2")  # as if killed (SIGKILL, OOM) before its first save: logs, no checkpoint
    (out / "latest").unlink()
    before = tree_hashes(out)
    with pytest.raises(ConfigError, match=r"^train.resume=true: .*run has no checkpoint, but holds an earlier run's "
                                          r"metrics.jsonl, annotations.jsonl .*train.overwrite_output_dir=true"):
        train(cfg(tiny_model_dir, out, "train.resume=true"))
    assert tree_hashes(out) == before
    # where there is nothing to lose, train.resume=true starts from step 0 (as requeue scripts pass it)
    train(cfg(tiny_model_dir, tmp_path / "new", "train.resume=true", "train.max_steps=1"))
    assert steps(tmp_path / "new") == [1]
    train(cfg(tiny_model_dir, out, "train.overwrite_output_dir=true", "train.max_steps=1"))
    assert steps(out) == [1]


def test_a_latest_that_is_a_directory_is_refused_before_any_step(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    (out / "latest").mkdir(parents=True)
    for extra in ((), ("train.resume=true",), ("train.overwrite_output_dir=true",)):
        with pytest.raises(ConfigError, match=rf"^train.output_dir: {out / 'latest'} is a directory; oaif keeps the "
                                              r"name of the newest checkpoint there"):
            train(cfg(tiny_model_dir, out, *extra))
    assert sorted(p.name for p in out.iterdir()) == ["latest"]


# --------------------------------------------------------------------------- non-finite training

def test_a_diverging_run_stops_naming_the_step_and_keeps_its_last_finite_checkpoint(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    # lr=1e30 passes validation (finite, >= 0); Adam's first step moves every weight by ~1e30
    result = cli(args(tiny_model_dir, out, "optim.lr=1e30", "train.max_steps=5", "train.save_every=1"))
    assert result.returncode == 2, result.stderr[-3000:]
    [line] = errors(result.stderr)
    assert "is not finite" in line and "lower optim.lr" in line and "Traceback" not in result.stderr
    step = int(line.split("step ")[1].split(":")[0])
    good = [p for p in out.glob("checkpoint-*")]
    assert all(int(p.name.split("-")[1]) < step for p in good)
    latest = (out / "latest").read_text().strip() if (out / "latest").exists() else None
    assert latest == (f"checkpoint-{step - 1}" if step > 1 else None)
    for p in good:
        assert all(torch.isfinite(t).all() for t in load_file(str(p / "model.safetensors")).values())


def test_a_learning_rate_adamw_cannot_represent_is_refused(tiny_model_dir, tmp_path):
    # 1e39 is finite as a Python float, but AdamW's step size overflows float32: a traceback before
    with pytest.raises(ConfigError, match=r"optim.lr: must be in \[0, 1e30\]"):
        cfg(tiny_model_dir, tmp_path / "run", "optim.lr=1e39")


# --------------------------------------------------------------------------- resume

def test_resume_refuses_another_experiment_naming_the_keys(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    train(cfg(tiny_model_dir, out, "train.max_steps=1"))
    with pytest.raises(ConfigError, match=r"loss\.type \('dpo' -> 'ipo'\), optim\.lr \(0\.001 -> 0\.002\).*"
                                          r"resume_allow_changes=\[loss\.type,optim\.lr\]"):
        train(cfg(tiny_model_dir, out, "train.resume=true", "loss.type=ipo", "optim.lr=2e-3", "train.max_steps=2"))
    summary = train(cfg(tiny_model_dir, out, "train.resume=true", "train.max_steps=2", "train.save_every=5",
                        "annotator.request_timeout=5", "logging.run_name=again"))
    assert summary["steps"] == 2
    summary = train(cfg(tiny_model_dir, out, "train.resume=true", "loss.type=ipo", "train.max_steps=3",
                        "train.resume_allow_changes=[loss.type]"))
    assert summary["steps"] == 3
    with pytest.raises(ConfigError, match="train.resume_allow_changes: 'loss.typo' is not a config key"):
        cfg(tiny_model_dir, out, "train.resume_allow_changes=[loss.typo]")


def test_allowed_optimizer_changes_take_effect_on_resume(tiny_model_dir, tmp_path):
    from oaif.trainer import Trainer

    out = tmp_path / "run"
    train(cfg(tiny_model_dir, out, "train.max_steps=2"))  # lr 1e-3, linear, betas (0.9, 0.999), eps 1e-8, no decay
    changes = ("optim.lr=5e-4", "optim.betas=[0.8,0.95]", "optim.eps=1e-6", "optim.weight_decay=0.1",
               "optim.scheduler=constant")
    t = Trainer(cfg(tiny_model_dir, out, "train.resume=true", "train.max_steps=4", *changes,
                    "train.resume_allow_changes=[optim.lr,optim.betas,optim.eps,optim.weight_decay,optim.scheduler]"))
    t.setup()
    [group] = t.optimizer.param_groups
    assert (group["lr"], group["initial_lr"], tuple(group["betas"]), group["eps"], group["weight_decay"]) == \
        (pytest.approx(5e-4), pytest.approx(5e-4), (0.8, 0.95), 1e-6, 0.1)
    assert t.scheduler.base_lrs == [pytest.approx(5e-4)] and t.scheduler.get_last_lr() == [pytest.approx(5e-4)]
    assert len(t.optimizer.state) > 0  # the moments were restored, only the settings are the new config's
    t.train()
    assert [r["lr"] for r in read_metrics(out / "metrics.jsonl")] == [pytest.approx(1e-3), pytest.approx(5e-4),
                                                                      pytest.approx(5e-4), pytest.approx(5e-4)]


def test_raising_max_steps_on_resume_continues_the_schedule_above_zero(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    train(cfg(tiny_model_dir, out, "train.max_steps=2", "optim.scheduler=linear"))
    first = read_metrics(out / "metrics.jsonl")
    train(cfg(tiny_model_dir, out, "train.max_steps=4", "optim.scheduler=linear", "train.resume=true"))
    lrs = [r["lr"] for r in read_metrics(out / "metrics.jsonl")]
    assert lrs[:2] == [r["lr"] for r in first] == [pytest.approx(1e-3), pytest.approx(5e-4)]
    assert lrs[2:] == [pytest.approx(1e-3 * (1 - 2 / 4)), pytest.approx(1e-3 * (1 - 3 / 4))]


# --------------------------------------------------------------------------- the failure stop

def test_a_run_shorter_than_the_failure_window_whose_judgments_all_failed_is_not_done(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(AnnotatorError, match=r"failed on 100% of the last 4 pairs"):
        train(cfg(tiny_model_dir, out, f"annotator.callable={JUDGES}:always_fails", "annotator.failure_window=64",
                  "train.max_steps=2"))
    assert (out / "latest").read_text().strip() == "checkpoint-2"


def test_a_run_that_trained_on_no_pair_ends_with_an_error(tiny_model_dir, tmp_path):
    def prompts(name: str, *texts: str) -> Path:
        path = tmp_path / name
        path.write_text("".join(json.dumps({"prompt": f"{t} question {i}"}) + "\n" for i, t in enumerate(texts)))
        return path

    ties = prompts("ties.jsonl", *["TIE"] * 8)
    out = tmp_path / "ties"
    run = cli(args(tiny_model_dir, out, f"data.path={ties}", "train.max_steps=2"))
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert errors(run.stderr) == [f"oaif: error: no pair was usable in the 2 steps of this run, so the policy did not "
                                  f"change: 4 tied (or under loss.min_confidence); saved {out / 'checkpoint-2'}"]
    assert (out / "latest").read_text().strip() == "checkpoint-2" and steps(out) == [1, 2]
    # a judge that fails on some pairs (under annotator.max_failure_rate) and ties on the others
    mixed = prompts("mixed.jsonl", *["FAIL", "TIE"] * 4)
    with pytest.raises(TrainingError, match=r"2 steps .*: 2 tied .*, 2 failed \(nan: 2\); saved .*checkpoint-2"):
        train(cfg(tiny_model_dir, tmp_path / "mixed", f"data.path={mixed}", "data.shuffle=false",
                  "data.eval_fraction=0", "annotator.max_failure_rate=0.9", "train.max_steps=2"))
    # offline: a preference file of ties
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"prompt": f"Q {i}?", "chosen": "Yes.", "rejected": "No.", "prob": 0.5}) + "\n"
                             for i in range(8)))
    with pytest.raises(TrainingError, match=r"no pair was usable in the 2 steps of this run.*: 4 tied"):
        train(cfg(tiny_model_dir, tmp_path / "offline", "train.mode=offline", f"data.preference_path={prefs}",
                  "data.eval_fraction=0", "train.max_steps=2"))


def test_a_resume_after_a_failure_stop_does_not_trip_on_the_past(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    judge = (f"annotator.callable={JUDGES}:fails_while_broken", "annotator.failure_window=8",
             "annotator.max_failure_rate=0.4", "train.max_steps=6", "train.batch_size=4")  # 4 pairs a step
    monkeypatch.setenv("OAIF_TEST_JUDGE_BROKEN", "1")
    with pytest.raises(AnnotatorError, match="failed on 100% of the last 8 pairs"):
        train(cfg(tiny_model_dir, out, *judge))
    assert (out / "latest").read_text().strip() == "checkpoint-2"
    # the judge is back: with the old window carried over, step 3 would see 4 of the last 8 pairs failed
    monkeypatch.setenv("OAIF_TEST_JUDGE_BROKEN", "0")
    summary = train(cfg(tiny_model_dir, out, *judge, "train.resume=true"))
    assert summary["steps"] == 6 and steps(out) == [1, 2, 3, 4, 5, 6]


# --------------------------------------------------------------------------- settings refused up front

def test_fp16_on_cpu_is_refused_not_silently_ignored(tiny_model_dir, tmp_path):
    from oaif.run.build import preflight

    with pytest.raises(ConfigError, match="train.mixed_precision: fp16 needs a GPU"):
        preflight(cfg(tiny_model_dir, tmp_path / "run", "train.mixed_precision=fp16"))


def test_offline_prompts_longer_than_max_prompt_tokens_are_skipped_and_counted(tiny_model_dir, tmp_path):
    prefs = tmp_path / "prefs.jsonl"
    long_prompt = "word " * 6000
    rows = [{"prompt": long_prompt, "chosen": "Yes.", "rejected": "No."}] + [
        {"prompt": f"Short question {i}?", "chosen": "Yes.", "rejected": "No."} for i in range(8)]
    prefs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = train(cfg(tiny_model_dir, tmp_path / "run", "train.mode=offline", f"data.preference_path={prefs}",
                        "data.max_prompt_tokens=256", "train.max_steps=2", "data.eval_fraction=0"))
    assert sum(summary["skipped_inputs"].values()) == 1, summary["skipped_inputs"]
