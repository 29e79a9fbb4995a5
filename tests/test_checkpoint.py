"""Checkpoints are atomic, loadable by transformers, and resumable (also with LoRA)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from oaif.checkpoint import latest_checkpoint, load_trainer_state
from oaif.config import load_config
from oaif.metrics import read_metrics
from oaif.trainer import train

ROOT = Path(__file__).resolve().parent.parent


def args(model_dir, out, *extra):
    return [f"model.name_or_path={model_dir}", "annotator.type=callable",
            "annotator.callable=oaif.annotators.rules:prefer_shorter", f"train.output_dir={out}",
            "train.batch_size=2", "sampling.max_new_tokens=8", "optim.lr=1.0e-3", "optim.warmup_steps=0",
            "logging.progress_bar=false", f"data.path={ROOT / 'data/prompts/demo_prompts.jsonl'}", *extra]


def test_latest_skips_incomplete_checkpoints(tmp_path):
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-3" / "trainer_state.pt").write_bytes(b"")
    (tmp_path / "checkpoint-5").mkdir()  # a crash before its state was written: never renamed like this, but be safe
    (tmp_path / ".tmp-checkpoint-6-123").mkdir()
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-3"
    (tmp_path / "latest").write_text("checkpoint-5\n")  # names an incomplete one: fall back
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-3"
    assert latest_checkpoint(tmp_path / "empty") is None


@pytest.mark.slow
def test_kill_at_any_moment_leaves_a_complete_latest(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "oaif.cli", "train", str(ROOT / "configs/demo.yaml"),
           *args(tiny_model_dir, out, "train.max_steps=1000", "train.save_every=1", "train.keep_last=2")]
    seen = set()
    for delay in (6.0, 7.3, 8.1, 9.7):
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=dict(os.environ, OMP_NUM_THREADS="1"))
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            continue
        assert (out / "latest").read_text().strip() == ckpt.name
        state = load_trainer_state(ckpt)
        assert state["step"] == int(ckpt.name.split("-")[1])
        AutoModelForCausalLM.from_pretrained(ckpt)  # loads: config, weights and all
        seen.add(ckpt.name)
        if "train.resume=true" not in cmd:
            cmd.append("train.resume=true")
    assert seen, "no checkpoint was written within the kill delays"
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl")]
    assert steps == sorted(steps)


def test_lora_resume_matches_uninterrupted(tiny_model_dir, tmp_path):
    cfg = ROOT / "configs/lora_demo.yaml"
    full = tmp_path / "full"
    train(load_config(cfg, args(tiny_model_dir, full, "train.max_steps=3")))
    part = tmp_path / "part"
    train(load_config(cfg, args(tiny_model_dir, part, "train.max_steps=3", "train.save_every=1")))
    # drop the last checkpoint, as if the run had died after step 2
    import shutil

    shutil.rmtree(part / "checkpoint-3")
    (part / "latest").write_text("checkpoint-2\n")
    train(load_config(cfg, args(tiny_model_dir, part, "train.max_steps=3", "train.resume=true")))
    a = load_file(str(full / "checkpoint-3" / "model.safetensors"))
    b = load_file(str(part / "checkpoint-3" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    base = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    assert any(not torch.equal(a[k], base[k]) for k in base)
