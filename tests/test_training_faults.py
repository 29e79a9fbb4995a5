"""An annotator server that is gone: pairs are masked and counted, and the run stops with a checkpoint."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from oaif.checkpoint import latest_checkpoint
from oaif.metrics import read_metrics

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
