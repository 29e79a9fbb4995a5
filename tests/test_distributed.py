"""Two processes (accelerate launch, gloo on CPU) take the same step as one with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from oaif.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent
ACCELERATE = Path(sys.executable).parent / "accelerate"


def run(args: list[str], procs: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    if procs == 1:
        cmd = [sys.executable, "-m", "oaif.cli", "train", *args]
    else:
        # on a CPU-only machine accelerate starts several processes with --multi_gpu and uses gloo
        cmd = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", str(procs), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "oaif.cli", "train", *args]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def common(model_dir, out, batch_size):
    return [str(ROOT / "configs" / "demo.yaml"), f"model.name_or_path={model_dir}", f"train.output_dir={out}",
            f"train.batch_size={batch_size}", "train.max_steps=3", "optim.lr=1.0e-3", "optim.warmup_steps=0",
            "logging.progress_bar=false", "sampling.max_new_tokens=10", "train.device=cpu"]


def assert_same_weights(a: Path, b: Path, atol: float) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
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
    assert_same_weights(tmp_path / "one" / "checkpoint-3", tmp_path / "two" / "checkpoint-3", atol=1e-4)
    assert len((tmp_path / "two" / "annotations.jsonl").read_text().splitlines()) > 0
