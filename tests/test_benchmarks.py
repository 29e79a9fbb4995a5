"""The benchmark scripts start: their ``--help`` runs (argparse before any heavy import) and names their options."""

from __future__ import annotations

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
