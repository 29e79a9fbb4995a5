"""An annotator server that is gone: pairs are masked and counted, and the run stops with a checkpoint."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from oaif.run.checkpoint import latest_checkpoint
from oaif.run.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent


def refused_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens here now: connections are refused
    return port


@pytest.mark.slow
def test_dead_annotator_server_stops_the_run_with_a_resumable_checkpoint(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "oaif.cli", "train", str(ROOT / "configs/harmless_openai_judge.yaml"),
           f"model.name_or_path={tiny_model_dir}", f"annotator.base_url=http://127.0.0.1:{refused_port()}/v1",
           "annotator.max_retries=0", "annotator.failure_window=6", "annotator.max_failure_rate=0.5",
           "train.batch_size=2", "train.max_steps=50", "sampling.max_new_tokens=6", f"train.output_dir={out}",
           "logging.progress_bar=false", f"data.path={ROOT / 'data/prompts/hh_harmless_prompts.jsonl'}"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("oaif: error:")]
    assert len(errors) == 1 and "failed on 100% of the last 6 pairs" in errors[0] and "connection_error" in errors[0]
    assert "train.resume=true" in errors[0] and "Traceback" not in result.stderr
    records = read_metrics(out / "metrics.jsonl")
    assert all(r["pairs_used"] == 0 and r["pairs_failed"] == r["pairs_judged"] for r in records)
    assert latest_checkpoint(out).name == f"checkpoint-{len(records)}"
    audit = [json.loads(line) for line in (out / "annotations.jsonl").read_text().splitlines()]
    assert audit and all(a["failure"] == "connection_error" and a["prob"] is None for a in audit)


@pytest.mark.slow
def test_after_a_failure_stop_a_resume_against_the_server_back_up_completes(llama_server, tiny_model_dir, tmp_path):
    out = tmp_path / "run"

    def run(base_url, *extra):
        cmd = [sys.executable, "-m", "oaif.cli", "train", str(ROOT / "configs/harmless_openai_judge.yaml"),
               f"model.name_or_path={tiny_model_dir}", f"annotator.base_url={base_url}",
               f"annotator.model={llama_server.model}", "annotator.max_retries=0", "annotator.failure_window=4",
               "annotator.max_failure_rate=0.4", "train.batch_size=2", "train.max_steps=4", "sampling.max_new_tokens=6",
               f"train.output_dir={out}", "logging.progress_bar=false", "data.eval_fraction=0",
               f"data.path={ROOT / 'data/prompts/hh_harmless_prompts.jsonl'}", *extra]
        return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)

    down = run(f"http://127.0.0.1:{refused_port()}/v1")  # the server is down: 4 of 4 pairs fail by step 2
    assert down.returncode == 2 and "failed on 100% of the last 4 pairs" in down.stderr, down.stderr[-3000:]
    assert latest_checkpoint(out).name == "checkpoint-2"
    # back up (annotator.base_url may change on resume); the 4 old failures are not counted again
    back = run(llama_server.base_url, "train.resume=true")
    assert back.returncode == 0, back.stderr[-3000:]
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["pairs_failed"] == 0 for r in records[2:])
