"""``oaif eval``: the win rate of judgments against hand-computed values, and the command end to
end on tiny real models (and a tiny real training run) with a rule judge. The statistics under it
are pinned in test_stats.py."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

from helpers import doc_oaif_args, make_tiny_llama
from oaif.annotators.base import Judgment
from oaif.commands import eval as eval_cmd
from oaif.config import load_annotator_config
from oaif.data.prompts import load_prompts
from oaif.errors import ConfigError, DataError
from oaif.evaluation.evaluate import evaluate_models
from oaif.evaluation.judging import win_rate
from oaif.evaluation.formats import fmt, fmt_ci
from oaif.evaluation.responses import EvalSettings

ROOT = Path(__file__).resolve().parent.parent
SHORTER = "oaif.annotators.rules:prefer_shorter"
JUDGE = ["--set", "type=callable", "--set", f"callable={SHORTER}"]


def ok(p: float) -> Judgment:
    return Judgment(prob=p, prob_ab=p, prob_ba=p, judge="hand")


def failed(reason: str) -> Judgment:
    return Judgment.failed(reason, judge="hand")


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="oaif eval")
    eval_cmd.add_arguments(parser)
    return eval_cmd.run(parser.parse_args(list(argv)))


def words(text: str) -> int:
    return len(text.split())


def assert_tables_well_formed(report: str) -> None:
    """Every Markdown table row has as many cells as its header."""
    rows = [line for line in report.splitlines() if line.startswith("|")]
    assert rows
    header = None
    for line in report.splitlines():
        if not line.startswith("|"):
            header = None
        elif header is None:
            header = line.count("|")
        else:
            assert line.count("|") == header, line


# -- statistics ---------------------------------------------------------------------------------
def test_win_rate_by_hand_with_ties_failures_and_swapped_order():
    judgments = [ok(0.9), ok(0.2), ok(0.5), ok(0.7), failed("timeout"), failed("nan"), failed("timeout")]
    a_is_first = [True, True, True, False, True, False, True]
    r = win_rate(judgments, a_is_first, n_bootstrap=500, seed=3)
    # P(A better) = 0.9, 0.2, 0.5, 1 - 0.7 = 0.3 -> scores 1, 0, 1/2, 0; failures left out
    assert r["win_rate"] == pytest.approx(1.5 / 4)
    assert r["mean_prob"] == pytest.approx((0.9 + 0.2 + 0.5 + 0.3) / 4)
    assert (r["wins"], r["ties"], r["losses"], r["judged"], r["pairs"]) == (1, 1, 2, 4, 7)
    assert r["failed"] == {"nan": 1, "timeout": 2} and r["failed_total"] == 3
    lo, hi = r["ci95"]
    assert 0.0 <= lo < 1.5 / 4 < hi <= 1.0
    # the bootstrap resamples scores 1, 0, 1/2, 0: its interval is bounded by their min and max
    assert r == win_rate(judgments, a_is_first, n_bootstrap=500, seed=3)  # seeded: reproducible


def test_degenerate_cases_and_no_judgments():
    r = win_rate([ok(0.8), ok(0.51), ok(1.0)], n_bootstrap=200)
    assert r["win_rate"] == 1.0 and r["ci95"] == [1.0, 1.0]
    r = win_rate([ok(0.1), ok(0.8)], [True, False], n_bootstrap=200)  # both favour B
    assert r["win_rate"] == 0.0 and r["ci95"] == [0.0, 0.0] and r["mean_prob"] == pytest.approx(0.15)
    r = win_rate([ok(0.5)] * 3, n_bootstrap=200)
    assert r["win_rate"] == 0.5 and r["ci95"] == [0.5, 0.5] and r["ties"] == 3
    r = win_rate([failed("unparseable")], n_bootstrap=200)
    assert r["win_rate"] is None and r["ci95"] is None and r["failed"] == {"unparseable": 1}
    with pytest.raises(ValueError, match="a_is_first"):
        win_rate([ok(0.9)], [True, False])


def test_annotator_options_and_argument_errors(tmp_path):
    cfg = load_annotator_config(None, ["type=callable", f"callable={SHORTER}"])
    assert (cfg.type, cfg.callable) == ("callable", SHORTER)
    run_cfg = tmp_path / "config.yaml"
    run_cfg.write_text("train:\n  max_steps: 3\nannotator:\n  type: llm\n  rubric: harmless\n")
    cfg = load_annotator_config(str(run_cfg), ["annotator.batch_size=2"])
    assert (cfg.type, cfg.rubric, cfg.batch_size) == ("llm", "harmless", 2)
    with pytest.raises(ConfigError, match=r"unknown config key 'annotator.rubrik' \(did you mean 'annotator.rubric'\?\)"):
        cli("a", "b", "--prompts", "p.jsonl", "--set", "rubrik=helpful")
    with pytest.raises(ConfigError, match="annotator.callable: annotator.type=callable needs"):
        cli("a", "b", "--prompts", "p.jsonl", "--set", "type=callable")
    with pytest.raises(ConfigError, match="expected two models"):
        cli("only_one", "--prompts", "p.jsonl")
    with pytest.raises(ConfigError, match="--prompts FILE is required"):
        cli("a", "b")
    with pytest.raises(ConfigError, match="not both"):
        cli("a", "b", "--run", str(tmp_path))
    with pytest.raises(ConfigError, match="--temperature must be > 0"):
        cli("a", "b", "--prompts", "p.jsonl", "--temperature", "0")
    with pytest.raises(DataError, match="run directory not found"):
        cli("--run", str(tmp_path / "nope"))
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(DataError, match="no config.yaml"):
        cli("--run", str(tmp_path / "empty_run"), *JUDGE)
    with pytest.raises(DataError, match="has no checkpoint-N directories"):
        cli("--run", str(tmp_path), *JUDGE)  # config.yaml above, no checkpoints
    with pytest.raises(DataError, match="prompt file not found"):
        cli("a", "b", "--prompts", str(tmp_path / "missing.jsonl"), *JUDGE)


# -- end to end ---------------------------------------------------------------------------------
PROMPTS = ["Name a fruit.", "Say hello.", "What is two plus two?", "Write one word.", "Describe the sky.",
           "Give me a color.", [{"role": "user", "content": "Tell me a joke."}]]


@pytest.fixture(scope="module")
def second_tiny_model(tmp_path_factory, smollm2_path) -> str:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama_b"), seed=1, tokenizer_source=smollm2_path)


def test_eval_two_models_end_to_end(tiny_model_dir, second_tiny_model, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    out = tmp_path / "eval"
    assert cli(tiny_model_dir, second_tiny_model, "--prompts", str(prompts), "--limit", "6", "--out", str(out),
               "--max-new-tokens", "10", "--bootstrap", "300", "--no-progress", *JUDGE) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "eval.json").read_text())
    report = (out / "report.md").read_text()
    for name in ("win_rate.png", "lengths.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in report

    assert_tables_well_formed(report)
    assert result["mode"] == "models" and result["prompts"]["count"] == 6 and len(result["samples"]) == 6
    assert result["judge"]["name"] == "callable:prefer_shorter" and "callable:prefer_shorter" in report
    assert result["generation"]["temperature"] == 0.7 and result["generation"]["max_new_tokens"] == 10
    c = result["comparisons"][0]
    assert (c["a"], c["b"], c["pairs"], c["judged"], c["failed_total"]) == ("A", "B", 6, 6, 0)
    # every judgment follows the rule (fewer words wins), in whichever slot A was shown
    scores = []
    for i, s in enumerate(result["samples"]):
        (row,) = s["judgments"]
        assert row["a_is_first"] == (i % 2 == 0)
        wa, wb = words(s["responses"]["A"]), words(s["responses"]["B"])
        assert row["score"] == (1.0 if wa < wb else 0.5 if wa == wb else 0.0)
        assert row["prob_a"] == pytest.approx(1 / (1 + math.exp(wa - wb)))
        assert 1 <= s["tokens"]["A"] <= 10 and 1 <= s["tokens"]["B"] <= 10
        scores.append(row["score"])
    assert c["win_rate"] == pytest.approx(sum(scores) / 6)
    assert c["ci95"][0] <= c["win_rate"] <= c["ci95"][1]
    # the report and the summary hold the numbers of eval.json
    assert f"{c['win_rate']:.3f}" == fmt(c["win_rate"]) and fmt(c["win_rate"]) in report
    assert fmt_ci(c["ci95"]) in report and fmt(c["mean_prob"]) in report
    assert fmt(c["win_rate"]) in printed and fmt_ci(c["ci95"]) in printed
    for label in ("A", "B"):
        t = result["models"][label]["tokens"]
        assert t["mean"] == pytest.approx(sum(s["tokens"][label] for s in result["samples"]) / 6)
        assert fmt(t["mean"], 1) in report and sum(t["histogram"]["counts"]) == 6
        assert result["models"][label]["chars"]["mean"] == pytest.approx(
            sum(len(s["responses"][label]) for s in result["samples"]) / 6)

    # the same model on both sides: the same seed gives the same responses, all ties, no judge call
    same = evaluate_models(tiny_model_dir, tiny_model_dir, load_prompts(prompts).records, annotator=_NeverCalled(),
                           limit=3, settings=EvalSettings(max_new_tokens=6, bootstrap=50), progress=False)
    c = same["comparisons"][0]
    assert (c["win_rate"], c["identical"], c["ties"], c["ci95"]) == (0.5, 3, 3, [0.5, 0.5])


class _NeverCalled:
    name = "never"

    def annotate(self, requests):
        raise AssertionError(f"the judge was asked about {len(requests)} identical pairs")


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory) -> Path:
    from oaif.config import load_config
    from oaif.trainer import train

    out = tmp_path_factory.mktemp("run") / "tiny"
    train(load_config(ROOT / "configs" / "demo.yaml", [
        f"model.name_or_path={tiny_model_dir}", "annotator.type=callable", f"annotator.callable={SHORTER}",
        "train.max_steps=2", "train.save_every=1", "train.batch_size=2", "sampling.max_new_tokens=8",
        f"train.output_dir={out}", "logging.progress_bar=false", "data.eval_fraction=0.1", "optim.lr=1.0e-3",
        "optim.warmup_steps=0", f"data.path={ROOT / 'data/prompts/demo_prompts.jsonl'}"]))
    return out


def test_eval_run_gives_a_curve_over_checkpoints(tiny_run, tiny_model_dir, tmp_path, capsys):
    from oaif.data.split import split_eval
    from oaif.models.chat import encode_prompt
    from oaif.models.load import load_tokenizer

    _, *argv = doc_oaif_args("oaif eval --run runs/demo")  # docs/training.md's command, on the tiny run
    argv = [str(tiny_run) if a == "runs/demo" else a for a in argv]
    assert cli(*argv, "--limit", "4", "--bootstrap", "200", "--no-progress", *JUDGE) == 0
    printed = capsys.readouterr().out
    out = tiny_run / "eval"
    result = json.loads((out / "eval.json").read_text())
    report = (out / "report.md").read_text()
    assert_tables_well_formed(report)
    assert result["mode"] == "run" and result["start_model"] == tiny_model_dir
    assert [c["step"] for c in result["comparisons"]] == [1, 2]
    assert [c["a"] for c in result["comparisons"]] == ["checkpoint-1", "checkpoint-2"]
    assert all(c["b"] == "start" and c["pairs"] == 4 for c in result["comparisons"])
    assert result["generation"]["max_new_tokens"] == 8  # the run's sampling.max_new_tokens

    # the held-out prompts are the trainer's eval split: filter by length, split_eval(kept, 0.1, seed 42)
    tok = load_tokenizer(tiny_model_dir)
    records = load_prompts(ROOT / "data/prompts/demo_prompts.jsonl").records
    kept = [r for r in records if len(encode_prompt(tok, r.prompt)) <= 256]
    _, held = split_eval(kept, 0.1, 42)
    assert [s["id"] for s in result["samples"]] == [r.id for r in held[:4]]
    assert result["prompts"]["kind"] == "run eval split" and result["prompts"]["split_of"] == len(kept)

    # the report names both judges and holds the numbers of eval.json; the plots exist
    assert "callable:prefer_shorter" in report and "Training judge" in report
    assert result["judge"]["same_as_training"] is True
    for c in result["comparisons"]:
        assert fmt(c["win_rate"]) in report and fmt_ci(c["ci95"]) in report
        assert fmt(c["win_rate"]) in printed
        assert set(result["models"]) == {"start", "checkpoint-1", "checkpoint-2"}
    for name in ("win_rate_over_steps.png", "length_over_steps.png", "training_curves.png", "lengths.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"]({name})" in report
    assert result["training"]["steps"] == 2 and "loss" in result["training"]["keys"]

    # --steps picks checkpoints; --prompts replaces the held-out set
    with pytest.raises(DataError, match=r"no checkpoint for step\(s\) 7 \(it has 1, 2\)"):
        cli("--run", str(tiny_run), "--steps", "7", *JUDGE)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    assert cli("--run", str(tiny_run), "--steps", "2", "--prompts", str(prompts), "--limit", "2", "--out",
               str(tmp_path / "e"), "--no-progress", *JUDGE) == 0
    result = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert [c["step"] for c in result["comparisons"]] == [2] and [s["id"] for s in result["samples"]] == ["p0", "p1"]
