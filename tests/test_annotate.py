"""``oaif annotate`` end to end: real files, real rule judges, a tiny real model, the real CLI."""

from __future__ import annotations

import gzip
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import doc_oaif_args
from oaif.cli import main
from oaif.config import load_annotator_config
from oaif.data.preferences import load_preferences
from oaif.errors import ConfigError
from test_openai_judge import FakeServer, Reply, completion, user_text

HH_FILE = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "hh_harmless_test.jsonl.gz"
SHORTER = "oaif.annotators.rules:prefer_shorter"
Z = 1.959963984540054


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def hh(*turns: str) -> str:
    """An HH transcript from alternating Human / Assistant turns."""
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns))


# A rule file: pointwise (fewer words is better) that raises on responses containing FAIL.
FAILING_RULE = '''
def score(prompt, response):
    if "FAIL" in response:
        raise ValueError("cannot judge this one")
    return -float(len(response.split()))
'''

# A pairwise rule: fewer words wins with P = 0.9, except prompts about coins, where it always
# prefers whichever response is shown first (so its two orders disagree and average to a tie).
PAIRWISE_RULE = '''
def judge(prompt, a, b):
    if "FAIL" in a or "FAIL" in b:
        raise RuntimeError("boom")
    if "coin" in prompt:
        return 0.7
    return 0.9 if len(a.split()) < len(b.split()) else 0.1
'''


# -- annotator options --------------------------------------------------------------------------
def test_annotator_config_from_yaml_group_top_level_and_set(tmp_path):
    assert load_annotator_config().type == "llm" and load_annotator_config().rubric == "helpful"
    group = tmp_path / "train.yaml"
    group.write_text("train:\n  max_steps: 3\nannotator:\n  type: callable\n  callable: x:y\n  rubric: harmless\n")
    cfg = load_annotator_config(str(group), ["rubric=summarize", "annotator.both_orders=false"])
    assert (cfg.type, cfg.callable, cfg.rubric, cfg.both_orders) == ("callable", "x:y", "summarize", False)
    top = tmp_path / "judge.yaml"
    top.write_text("type: llm\nmodel: '123'\nbatch_size: 4\n")
    cfg = load_annotator_config(str(top), ["max_length=99"])
    assert (cfg.model, cfg.batch_size, cfg.max_length) == ("123", 4, 99)
    with pytest.raises(ConfigError, match=r"unknown config key 'annotator.rubrik' \(did you mean 'annotator.rubric'\?\)"):
        load_annotator_config(None, ["rubrik=harmless"])
    with pytest.raises(ConfigError, match="annotator.batch_size: expected int"):
        load_annotator_config(None, ["batch_size=many"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_annotator_config(None, ["rubric"])
    with pytest.raises(ConfigError, match="annotator.type: must be one of"):
        load_annotator_config(None, ["type=oracle"])
    with pytest.raises(ConfigError, match="not found"):
        load_annotator_config(str(tmp_path / "nope.yaml"))


# -- pairs -> preference file -------------------------------------------------------------------
def test_pairs_file_is_labelled_and_oriented_by_the_judge(tmp_path, capsys):
    rows = [
        {"id": "p1", "prompt": "Say hi.", "a": "hello there my friend", "b": "hi"},      # b shorter by 3
        {"id": "p2", "prompt": "Name a fruit.", "a": "apple", "b": "a red apple"},      # a shorter by 2
        {"id": "p3", "prompt": "Tie?", "a": "one two", "b": "three four"},              # tie: skipped
        {"id": "p4", "prompt": "Same.", "a": "same", "b": "same"},                      # identical: skipped
        {"id": "p5", "prompt": [{"role": "user", "content": "Chat?"}], "a": "x y", "b": "z"},
    ]
    src = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "prefs.jsonl"
    report = tmp_path / "report.json"
    assert main(["annotate", str(src), "--out", str(out), "--report", str(report), "--no-progress",
                 "--set", "type=callable", "--set", f"callable={SHORTER}"]) == 0
    prefs = load_preferences(out)
    got = {r.id: r for r in prefs.records}
    assert set(got) == {"p1", "p2", "p5"}
    assert (got["p1"].chosen, got["p1"].rejected) == ("hi", "hello there my friend")
    assert got["p1"].prob == pytest.approx(sigmoid(3))
    assert (got["p2"].chosen, got["p2"].rejected) == ("apple", "a red apple")
    assert got["p2"].prob == pytest.approx(sigmoid(2))
    assert got["p5"].prompt == [{"role": "user", "content": "Chat?"}] and got["p5"].chosen == "z"
    assert all(r.prob > 0.5 for r in prefs.records)
    rep = json.loads(report.read_text())
    assert rep["mode"] == "pairs" and rep["judge"] == "callable:prefer_shorter"
    assert (rep["rows"], rep["pairs"], rep["judged"], rep["written"], rep["ties"]) == (5, 4, 4, 3, 1)
    assert rep["skipped"] == {"identical": 1} and rep["failed"] == {}
    assert rep["position_consistency"] == 1.0  # a pointwise rule is order-free
    assert "written          3 preferences" in capsys.readouterr().out


def test_failing_judge_pairs_are_counted_not_written(tmp_path, capsys):
    rule = tmp_path / "rule.py"
    rule.write_text(FAILING_RULE)
    cfg = tmp_path / "judge.yaml"
    cfg.write_text(f"annotator:\n  type: callable\n  callable: {rule}:score\n")
    rows = [{"prompt": "q1", "chosen": "long long answer", "rejected": "short"},
            {"prompt": "q2", "chosen": "FAIL here", "rejected": "fine"},
            {"prompt": "q3", "chosen": "ok", "rejected": "FAIL again"},
            {"prompt": "q4", "chosen": "brief", "rejected": "much longer answer"}]
    src = write_jsonl(tmp_path / "prefs_in.jsonl", rows)
    out = tmp_path / "out.jsonl.gz"
    report = tmp_path / "r.json"
    assert main(["annotate", str(src), "--out", str(out), "--annotator-config", str(cfg), "--batch-size", "3",
                 "--report", str(report), "--no-progress"]) == 0
    prefs = load_preferences(out)
    assert [(r.id, r.chosen) for r in prefs.records] == [("0", "short"), ("3", "brief")]
    assert prefs.records[0].prob == pytest.approx(sigmoid(2))
    rep = json.loads(report.read_text())
    assert rep["failed"] == {"callable_error": 2} and rep["failed_total"] == 2 and rep["written"] == 2
    assert "callable_error 2" in capsys.readouterr().out
    with gzip.open(out, "rt") as f:
        assert len(f.readlines()) == 2


ALL_FAIL = {  # a judge whose every judgment fails: --set options, and the fake server's answer (None: no server)
    "callable_error": (["type=callable", "callable={rule}:score"], None),
    "http_500": (["type=openai", "base_url={url}", "model=fake", "max_retries=0"],
                 lambda body, headers: Reply(500, {"error": {"message": "boom"}})),
    "unparseable": (["type=openai", "base_url={url}", "model=fake", "max_retries=0"],  # a server echoing the prompt
                    lambda body, headers: Reply(body=completion(user_text(body)))),
}


@pytest.mark.parametrize("labels", [False, True], ids=["label", "against_labels"])
@pytest.mark.parametrize("judge", list(ALL_FAIL))
def test_every_judgment_failed_is_one_line_and_writes_nothing(tmp_path, capsys, judge, labels):
    rule = tmp_path / "rule.py"
    rule.write_text(FAILING_RULE)
    src = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q1", "chosen": "FAIL one", "rejected": "FAIL two"},
                                                 {"prompt": "q2", "chosen": "FAIL", "rejected": "FAIL three"}])
    out, report = tmp_path / "out.jsonl", tmp_path / "r.json"
    sets, respond = ALL_FAIL[judge]
    with FakeServer(respond or (lambda body, headers: Reply(500))) as server:
        argv = ["annotate", str(src), "--out", str(out), "--report", str(report), "--no-progress",
                *(["--against-labels"] if labels else [])]
        for s in sets:
            argv += ["--set", s.format(rule=rule, url=server.base_url)]
        assert main(argv) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("oaif: error:")]
    assert errors == [f"oaif: error: every judgment failed (2 pairs; {judge} 2); nothing written"], captured.err
    assert not out.exists() and not report.exists() and captured.out == ""


def test_no_pair_or_prompt_left_to_judge_is_one_line_and_writes_nothing(tmp_path, capsys):
    empty = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": ""}, {"prompt": "   "}])
    same = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": "same", "rejected": "same"}])
    tied = write_jsonl(tmp_path / "tied.jsonl", [{"prompt": "q", "chosen": "one two", "rejected": "six ten"}])
    out = tmp_path / "out.jsonl"
    judge = ["--set", "type=callable", "--set", f"callable={SHORTER}", "--no-progress"]
    for argv, expect in (
            # every prompt empty: refused before the model (not a model directory here) is loaded
            ([str(empty), "--sample-from", str(tmp_path / "no-model")], f"{empty}: no prompt to judge (skipped: empty 2)"),
            ([str(same)], f"{same}: no pair to judge (skipped: identical 1)"),
            ([str(tied)], "no preference to write: the judge called all 1 judged pairs ties")):
        assert main(["annotate", *argv, "--out", str(out), *judge]) == 2
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("oaif: error:")]
        assert len(errors) == 1 and expect in errors[0] and errors[0].endswith("; nothing written"), err
        assert not out.exists()


def test_an_output_naming_the_input_is_refused_and_the_human_labels_stay(tmp_path, capsys):
    src = write_jsonl(tmp_path / "human.jsonl", [{"prompt": "q", "chosen": "a much longer human pick", "rejected": "no"}])
    before = src.read_bytes()
    (tmp_path / "link.jsonl").symlink_to(src)
    judge = ["--set", "type=callable", "--set", f"callable={SHORTER}", "--no-progress"]
    for flags in (["--out", str(src)], ["--out", "human.jsonl"], ["--out", str(tmp_path / "link.jsonl")],
                  ["--against-labels", "--out", str(src)], ["--against-labels", "--report", str(src)]):
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(tmp_path)
            assert main(["annotate", str(src), *flags, *judge]) == 2
        err = capsys.readouterr().err
        assert err.strip() == f"oaif: error: {flags[-2]}: {src} is the input file; writing it would replace the input " \
                              "(choose another file)", err
        assert src.read_bytes() == before
    assert main(["annotate", str(src), "--out", str(tmp_path / "x"), "--report", str(tmp_path / "x"), *judge]) == 2
    assert "--out and --report name the same file" in capsys.readouterr().err


# -- --sample-from ------------------------------------------------------------------------------
@pytest.mark.slow
def test_sample_from_a_tiny_model_writes_a_preference_per_prompt(tiny_model_dir, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"id": "a", "prompt": "Write a haiku."},
                                                       {"id": "b", "prompt": "Name a colour."},
                                                       {"id": "c", "prompt": [{"role": "user", "content": "Hi!"}]}])
    out = tmp_path / "offline.jsonl"
    report = tmp_path / "r.json"
    # the judge is the sampled model itself (reused, not loaded twice)
    assert main(["annotate", str(prompts), "--sample-from", tiny_model_dir, "--out", str(out), "--max-new-tokens", "6",
                 "--batch-size", "2", "--report", str(report), "--no-progress",
                 "--set", "type=llm", "--set", f"model={tiny_model_dir}", "--set", "max_length=4096"]) == 0
    rep = json.loads(report.read_text())
    prefs = load_preferences(out)
    assert len(prefs) == rep["written"] <= 3
    assert rep["written"] + rep["ties"] + rep["failed_total"] + rep["skipped"].get("identical", 0) == 3
    assert rep["judge"] == f"llm:{tiny_model_dir}:helpful" and rep["mode"] == "sample"
    ids = {"a", "b", "c"}
    for r in prefs.records:
        assert r.id in ids and r.chosen != r.rejected and 0.5 < r.prob <= 1.0


# -- --against-labels ---------------------------------------------------------------------------
def hh_rows() -> list[dict]:
    def pair(question, chosen, rejected):
        return {"chosen": hh(question, chosen), "rejected": hh(question, rejected)}

    return [
        pair("How do I boil an egg?", "Boil it ten minutes.", "Put it in water and boil it for about ten minutes."),
        {"chosen": hh("Hi", "Hey.", "Tell me a joke", "No."), "rejected": hh("Hi", "Hey.", "Tell me a joke", "Why not, here is one.")},
        pair("What is 2+2?", "It is four, as two plus two makes four.", "Four."),           # judge disagrees
        pair("Should I flip a coin?", "Yes, flip it.", "No, do not flip it now."),           # inconsistent -> tie
        pair("FAIL this?", "FAIL", "fine"),                                                 # judge raises
        pair("Capital of France?", "Paris.", "The capital of France is Paris."),
        {"chosen": hh("Unfinished"), "rejected": hh("Unfinished")},                          # unparseable: skipped
    ]


def test_against_labels_numbers_match_a_hand_computation(tmp_path, capsys):
    rule = tmp_path / "pairwise.py"
    rule.write_text(PAIRWISE_RULE)
    src = tmp_path / "hh.jsonl.gz"
    with gzip.open(src, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in hh_rows())
    report = tmp_path / "agreement.json"
    judgments = tmp_path / "judgments.jsonl"
    assert main(["annotate", str(src), "--against-labels", "--report", str(report), "--out", str(judgments),
                 "--batch-size", "2", "--no-progress", "--set", "type=callable", "--set", f"callable={rule}:judge"]) == 0
    rep = json.loads(report.read_text())
    # judged pairs: agree, agree, disagree, tie, agree -> (3 + 0.5) / 5
    assert rep["rows"] == 7 and rep["skipped"] == {"unparseable": 1}
    assert (rep["pairs"], rep["judged"], rep["failed"]) == (6, 5, {"callable_error": 1})
    assert (rep["agree"], rep["disagree"], rep["ties"]) == (3, 1, 1)
    assert rep["agreement"] == pytest.approx(0.7)
    p, n = 0.7, 5
    center = (p + Z * Z / (2 * n)) / (1 + Z * Z / n)
    half = Z * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n)) / (1 + Z * Z / n)
    assert rep["agreement_ci95"] == pytest.approx([center - half, center + half])
    assert rep["ci_method"] == "wilson"
    assert rep["position_consistency"] == pytest.approx(4 / 5) and rep["consistency_pairs"] == 5
    assert rep["mean_confidence"] == pytest.approx((4 * 0.9 + 0.5) / 5)
    assert rep["mean_p_chosen"] == pytest.approx((0.9 + 0.9 + 0.1 + 0.5 + 0.9) / 5)
    # 8 readings from the 4 consistent pairs pick the first shown half the time; the coin pair's 2 pick it always
    assert rep["first_position_rate"] == pytest.approx((4 + 2) / 10)
    assert rep["agreement_by_order"] == pytest.approx({"chosen_shown_first": (3 + 1) / 5, "chosen_shown_second": 3 / 5})
    assert rep["judge"] == "callable:judge"
    rows = [json.loads(line) for line in judgments.read_text().splitlines()]
    assert len(rows) == 6 and [r["agree"] for r in rows if r["failure"] is None] == [1.0, 1.0, 0.0, 0.5, 1.0]
    assert rows[3]["consistent"] is False and rows[4]["failure"] == "callable_error"
    captured = capsys.readouterr()
    assert "agreement        0.700" in captured.out and "Wilson" in captured.out
    # consistency 0.8, mean |P - 0.5| 0.32: labels, not coin flips (the training run's thresholds)
    assert rep["judge_noise"] == {"noise": False, "distance": pytest.approx(0.32), "min_consistency": 0.5,
                                  "min_distance": 0.1}
    assert "verdict          both-order consistency 0.800 (noise under 0.5), mean |P - 0.5| 0.320" in captured.out
    assert next(line for line in captured.out.splitlines() if line.startswith("verdict")).endswith(
        "(noise under 0.1): better than coin flips")
    assert "oaif: warning" not in captured.err


def test_against_labels_accepts_a_plain_preference_file_and_limit(tmp_path):
    src = write_jsonl(tmp_path / "labelled.jsonl", [
        {"prompt": "q", "chosen": "short", "rejected": "a much longer reply"},
        {"prompt": "q", "chosen": "a much longer reply", "rejected": "short"},
        {"prompt": "q", "chosen": "tiny", "rejected": "not so tiny"},
    ])
    report = tmp_path / "r.json"
    assert main(["annotate", str(src), "--against-labels", "--limit", "2", "--report", str(report), "--no-progress",
                 "--set", "type=callable", "--set", f"callable={SHORTER}", "--set", "both_orders=false"]) == 0
    rep = json.loads(report.read_text())
    assert rep["pairs"] == 2 and rep["agreement"] == 0.5 and rep["limit"] == 2


def test_against_labels_says_when_the_judge_is_noise(tmp_path, capsys):
    # a judge that picks the response shown first: its two orders never agree and average near 0.5
    src = write_jsonl(tmp_path / "labelled.jsonl", [
        {"prompt": "q", "chosen": "short", "rejected": "a much longer reply"},
        {"prompt": "q", "chosen": "a much longer reply", "rejected": "short"},
        {"prompt": "q", "chosen": "tiny", "rejected": "not so tiny"},
    ])
    report = tmp_path / "r.json"
    judges = Path(__file__).resolve().parent / "judges_for_tests.py"
    assert main(["annotate", str(src), "--against-labels", "--report", str(report), "--no-progress",
                 "--set", "type=callable", "--set", f"callable={judges}:first_shown_mostly"]) == 0
    rep = json.loads(report.read_text())
    assert rep["position_consistency"] == 0.0 and rep["mean_confidence"] == pytest.approx(0.55)
    assert rep["judge_noise"]["noise"] is True and rep["judge_noise"]["distance"] == pytest.approx(0.05)
    captured = capsys.readouterr()
    assert ("verdict          both-order consistency 0.000 (noise under 0.5), mean |P - 0.5| 0.050 (noise under "
            "0.1): no better than coin flips") in captured.out
    warning = [line for line in captured.err.splitlines() if line.startswith("oaif: warning: ")]
    assert len(warning) == 1 and "use a stronger judge (docs/judges.md, \"Which judge runs here?\")" in warning[0]


def test_against_labels_rejects_unlabelled_pairs(tmp_path, capsys):
    src = write_jsonl(tmp_path / "ab.jsonl", [{"prompt": "q", "a": "x", "b": "y"}])
    assert main(["annotate", str(src), "--against-labels", "--set", "type=callable", "--set", f"callable={SHORTER}"]) == 2
    assert "--against-labels needs 'chosen' and 'rejected'" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not HH_FILE.is_file(), reason="shared HH test split not present")
def test_against_labels_with_the_real_smollm2_judge_on_20_hh_pairs(smollm2_path, tmp_path):
    report = tmp_path / "hh.json"
    assert main(["annotate", str(HH_FILE), "--against-labels", "--limit", "20", "--report", str(report),
                 "--no-progress", "--set", "rubric=harmless"]) == 0
    rep = json.loads(report.read_text())
    assert rep["judge"] == "llm:smollm2-135m-instruct:harmless"
    assert rep["pairs"] == 20 and rep["judged"] + rep["failed_total"] == 20 and rep["judged"] > 0
    for key in ("agreement", "position_consistency", "mean_p_chosen", "first_position_rate"):
        assert 0.0 <= rep[key] <= 1.0, key
    assert 0.5 <= rep["mean_confidence"] <= 1.0
    lo, hi = rep["agreement_ci95"]
    assert 0.0 <= lo <= rep["agreement"] <= hi <= 1.0
    assert rep["agree"] + rep["disagree"] + rep["ties"] == rep["judged"]


# -- one-line CLI errors ------------------------------------------------------------------------
def run_cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "oaif.cli", "annotate", *argv], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


@pytest.mark.parametrize("case", ["missing_input", "unknown_key", "bad_format", "no_out"])
def test_cli_errors_are_one_line(tmp_path, case):
    good = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q", "a": "x", "b": "y"}])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "a": "x", "b": "y"}\nnot json\n')
    argv, expect = {
        "missing_input": ([str(tmp_path / "missing.jsonl"), "--out", "o.jsonl"], "input file not found"),
        "unknown_key": ([str(good), "--out", "o.jsonl", "--set", "rubrik=harmless"], "unknown config key 'annotator.rubrik'"),
        "bad_format": ([str(bad), "--out", "o.jsonl", "--set", "type=callable", "--set", f"callable={SHORTER}"],
                       "line 2: not valid JSON"),
        "no_out": ([str(good)], "--out is required"),
    }[case]
    proc = run_cli(*argv, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("oaif: error:") and expect in lines[0], proc.stderr
    assert not (tmp_path / "o.jsonl").exists()


def test_the_documented_annotate_command_measures_a_judge_against_the_shipped_labels(tiny_model_dir, tmp_path,
                                                                                    capsys, monkeypatch):
    # docs/judges.md's command, on the tiny model and the first 2 pairs
    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    argv = doc_oaif_args("oaif annotate data/prompts/hh_harmless_preferences.jsonl --against-labels "
                         "--set rubric=harmless")
    report = tmp_path / "report.json"
    assert main([*argv, "--set", f"model={tiny_model_dir}", "--limit", "2", "--report", str(report),
                 "--no-progress"]) == 0
    rep = json.loads(report.read_text())
    assert rep["pairs"] == 2 and 0 <= rep["agreement"] <= 1 and rep["limit"] == 2
    assert "verdict" in capsys.readouterr().out
