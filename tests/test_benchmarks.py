"""Quick checks of the benchmark scripts (the full runs are too long for the suite): ``--help`` runs
(argparse before any heavy import) and names the options; tiny runs where they are cheap."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_weight_sync_help_names_its_options():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_weight_sync.py"), "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for option in ("--repeats", "--model", "--bucket-mib"):
        assert option in result.stdout
    assert "time_weight_sync_s" in result.stdout


def test_bench_memory_counts_the_held_tensors_of_one_process(tmp_path):
    # one process, full fine-tuning: the policy and its reference copy (2x the model), one gradient per
    # weight (1x) and AdamW's two states (2x), counted from the tensors
    out = tmp_path / "memory.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run([sys.executable, "benchmarks/bench_memory.py", "--model", "tiny", "--steps", "1",
                             "--only", "one", "--json", str(out)], capture_output=True, text=True, cwd=ROOT,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (rank,) = json.loads(out.read_text())["one"]
    full = rank["model_full"]
    assert full > 0 and (rank["weights"], rank["grads"], rank["adam"]) == (2 * full, full, 2 * full)
    assert "| 1 process | 0 |" in result.stdout and result.stdout.startswith("model: tiny")


def test_bench_memory_refuses_an_unknown_configuration():
    result = subprocess.run([sys.executable, "benchmarks/bench_memory.py", "--only", "zero"], capture_output=True,
                            text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 2 and "--only: unknown configuration zero" in result.stderr
