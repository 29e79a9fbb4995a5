"""Every experiment script runs end to end in its smoke mode (one step, tiny budgets, tiny policy)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RULE = ["--judge-set", "type=callable", "--judge-set", "callable=oaif.annotators.rules:prefer_shorter",
        "--eval-set", "type=callable", "--eval-set", "callable=oaif.annotators.rules:prefer_shorter"]


def run(script: str, *args: str) -> str:
    result = subprocess.run([sys.executable, str(ROOT / "experiments" / script), "--smoke", *args],
                            capture_output=True, text=True, cwd=ROOT / "experiments", timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return result.stdout


@pytest.mark.slow
def test_online_vs_offline_smoke(tiny_model_dir, tmp_path):
    out = run("online_vs_offline.py", "--model", tiny_model_dir, "--out", str(tmp_path), *RULE)
    summary = json.loads((tmp_path / "summary.json").read_text())
    [row] = summary["rows"]
    assert set(row) >= {"online_vs_offline", "online_vs_start", "offline_vs_start"}
    assert all(0 <= row[k]["win_rate"] <= 1 for k in ("online_vs_offline", "online_vs_start", "offline_vs_start"))
    assert "online vs offline" in out and (tmp_path / "dpo" / "offline_prefs.jsonl").is_file()


@pytest.mark.slow
def test_rubric_control_smoke(tiny_model_dir, tmp_path):
    run("rubric_control.py", "--model", tiny_model_dir, "--out", str(tmp_path), "--rubrics", "helpful_short",
        "--rule", "--eval-set", "type=callable", "--eval-set", "callable=oaif.annotators.rules:prefer_shorter")
    rows = json.loads((tmp_path / "summary.json").read_text())["rows"]
    assert [r["rubric"] for r in rows] == ["helpful_short", "rule:prefer_shorter"]
    assert all(r["len_a"] is not None for r in rows)


@pytest.mark.slow
def test_rm_vs_llm_smoke(tiny_model_dir, tmp_path):
    run("rm_vs_llm.py", "--model", tiny_model_dir, "--out", str(tmp_path))
    summary = json.loads((tmp_path / "summary.json").read_text())
    agreement = summary["rows"][0]
    assert 0 <= agreement["rm_agreement"]["agreement"] <= 1 and 0 <= agreement["llm_agreement"]["agreement"] <= 1
    assert {r["eval_judge"] for r in summary["rows"][1:]} == {"LLM judge (SmolLM2, harmless rubric)", "reward model"}
