"""ExPO on a rule-curve run: extrapolate its final checkpoint away from the start model and compare.

    python experiments/expo_compare.py --curve runs/experiments/rule_curve [--alphas 0.5,1,2,4] [--out DIR]

--curve is an output directory of experiments/rule_curve.py (its `run/` with checkpoints and
`run/eval/eval.json`, and `heldout_prompts.jsonl`). For each alpha, `oaif expo` writes
theta_aligned + alpha * (theta_aligned - theta_start) (Zheng et al. 2024) from the run's final
checkpoint (or `--step N`) and its starting model, and `oaif eval` compares that model with the start
and with the aligned checkpoint on the SAME held-out prompts, with the same judge and the same
generation settings as the run's own `oaif eval --run` (all read from its eval.json: judge config,
temperature, seed, max new tokens, batch size, prompt limits, dtype, bootstrap). Because every model
samples with the same seed, the start's and the checkpoint's responses here equal those of the run's
evaluation; the summary counts how many do (a check that the comparison is the same one).

Under LoRA the checkpoint holds merged weights, so the extrapolated model is the start plus
(1 + alpha) times the adapter's product B A: ExPO here scales the learned low-rank change.

Written to --out: models/expo-ALPHA/ (the extrapolated model directories; weights, not for commits),
eval/expo-ALPHA_vs_start/ and eval/expo-ALPHA_vs_aligned/ (each `oaif eval`'s eval.json, report.md),
eval_judge.yaml (the run evaluation's judge), summary.json / summary.md (per model: held-out mean
tokens with a 95% bootstrap CI over prompts, the median, empty answers, win rate vs the start and
vs the aligned checkpoint with CIs and W/T/L; one prompt's answers), expo.png, commands.log.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import yaml

from common import ROOT, oaif


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--curve", required=True, help="an output directory of experiments/rule_curve.py")
    ap.add_argument("--step", type=int, default=None, help="the checkpoint to extrapolate (default: the run's latest)")
    ap.add_argument("--alphas", default="0.5,1,2,4", help="comma-separated ExPO strengths (default 0.5,1,2,4)")
    ap.add_argument("--out", default="runs/experiments/expo_compare", help="output directory")
    return ap


def parse_args() -> tuple[argparse.Namespace, Path]:
    args = build_parser().parse_args()
    try:
        args.alphas = [float(a) for a in args.alphas.split(",") if a.strip()]
    except ValueError:
        raise SystemExit(f"--alphas must be comma-separated numbers, got {args.alphas!r}") from None
    if not args.alphas:
        raise SystemExit("--alphas names no alpha")
    for name in ("curve", "out"):
        if not Path(getattr(args, name)).is_absolute():
            setattr(args, name, str(ROOT / getattr(args, name)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return args, out


def run_eval_of(curve: Path) -> dict:
    path = curve / "run" / "eval" / "eval.json"
    if not path.is_file():
        raise SystemExit(f"--curve {curve}: no {path} (an output directory of experiments/rule_curve.py)")
    return json.loads(path.read_text())


def aligned_checkpoint(curve: Path, step: int | None) -> Path:
    run_dir = curve / "run"
    name = f"checkpoint-{step}" if step is not None else (run_dir / "latest").read_text().strip()
    if not (run_dir / name / "config.json").is_file():
        raise SystemExit(f"--curve {curve}: no checkpoint {run_dir / name}")
    return run_dir / name


def eval_options(run_eval: dict, judge_yaml: Path) -> list[str]:
    """The `oaif eval` options that repeat the run's evaluation: prompts, generation, bootstrap and judge."""
    g, b, p = run_eval["generation"], run_eval["bootstrap"], run_eval["prompts"]
    opts = ["--prompts", p["path"], "--limit", str(p["count"]), "--temperature", str(g["temperature"]),
            "--top-p", str(g["top_p"]), "--max-new-tokens", str(g["max_new_tokens"]), "--seed", str(g["seed"]),
            "--batch-size", str(g["batch_size"]), "--max-prompt-tokens", str(g["max_prompt_tokens"]),
            "--dtype", g["dtype"], "--bootstrap", str(b["resamples"]), "--bootstrap-seed", str(b["seed"]),
            "--annotator-config", str(judge_yaml), "--no-progress"]
    if g["system_prompt"]:
        opts += ["--system-prompt", g["system_prompt"]]
    if not g["chat_template"]:
        opts.append("--no-chat-template")
    return opts


def responses_of(result: dict, label: str) -> dict[str, str]:
    return {s["id"]: s["responses"][label] for s in result["samples"]}


def length_row(result: dict, label: str, boot: dict) -> dict:
    """A model's held-out answers in an eval.json: mean tokens with a bootstrap CI over prompts, the median,
    and the empty answers (the end-of-sequence token alone: the rule's degenerate optimum)."""
    from statistics import median

    from oaif.stats import bootstrap_ci

    values = [s["tokens"][label] for s in result["samples"]]
    return {"tokens_mean": sum(values) / len(values), "tokens_ci95": list(bootstrap_ci(values, boot["resamples"],
                                                                                       boot["seed"])),
            "tokens_median": median(values), "n_prompts": len(values),
            "empty": sum(not s["responses"][label].strip() for s in result["samples"])}


def win(c: dict) -> dict:
    return {k: c[k] for k in ("win_rate", "ci95", "wins", "ties", "losses", "judged", "failed_total", "identical")}


def label_of(result: dict, model: str) -> str:
    """The label of ``model`` (a checkpoint directory) in an `oaif eval --run` result."""
    want = Path(model).resolve()
    found = [label for label, m in result["models"].items() if Path(m["model"]).resolve() == want]
    if not found:
        raise SystemExit(f"{model} is not among the models of the run's evaluation; pass one of its steps with --step")
    return found[0]


def same_count(a: dict[str, str], b: dict[str, str]) -> int:
    return sum(a[k] == b[k] for k in a)


def compare(args, out: Path, log: Path, run_eval: dict, aligned: Path, start: str, opts: list[str]) -> dict:
    """The start, the aligned checkpoint and every ExPO model: lengths, win rates, and the checks that the
    responses here equal the run evaluation's."""
    boot = run_eval["bootstrap"]
    ck_label = label_of(run_eval, str(aligned))
    ck_comp = next(c for c in run_eval["comparisons"] if c["a"] == ck_label)
    start_resp, ck_resp = responses_of(run_eval, "start"), responses_of(run_eval, ck_label)
    rows = [{"model": "start", "path": start, **length_row(run_eval, "start", boot)},
            {"model": f"aligned ({ck_label})", "path": str(aligned), **length_row(run_eval, ck_label, boot),
             "vs_start": win(ck_comp)}]
    checks = []
    for alpha in args.alphas:
        model = out / "models" / f"expo-{alpha:g}"
        oaif("expo", "--base", start, "--aligned", str(aligned), "--alpha", f"{alpha:g}", "--out", str(model),
             "--overwrite", log=log)
        row = {"model": f"ExPO alpha {alpha:g}", "alpha": alpha, "path": str(model)}
        responses = {}
        for other, other_path, reference in (("start", start, start_resp), ("aligned", str(aligned), ck_resp)):
            eval_dir = out / "eval" / f"expo-{alpha:g}_vs_{other}"
            oaif("eval", str(model), other_path, "--out", str(eval_dir), *opts, log=log)
            result = json.loads((eval_dir / "eval.json").read_text())
            c = result["comparisons"][0]
            row[f"vs_{other}"] = {**win(c), "eval_json": str(eval_dir / "eval.json")}
            responses[other] = responses_of(result, c["a"])
            if other == "start":
                row.update(length_row(result, c["a"], boot))
            checks.append({"eval": str(eval_dir / "eval.json"), "model": other, "prompts": len(reference),
                           "same_as_run_eval": same_count(responses_of(result, c["b"]), reference)})
        row["same_responses_in_both_evals"] = same_count(responses["start"], responses["aligned"])
        rows.append(row)
    return {"rows": rows, "checks": checks}


def example(out: Path, run_eval: dict, rows: list[dict], ck_label: str) -> dict:
    """One held-out prompt's answers from every model (the first prompt of the run's evaluation)."""
    s = run_eval["samples"][0]
    answers = {"start": s["responses"]["start"], rows[1]["model"]: s["responses"][ck_label]}
    for r in rows[2:]:
        result = json.loads(Path(r["vs_start"]["eval_json"]).read_text())
        answers[r["model"]] = next(x for x in result["samples"] if x["id"] == s["id"])["responses"]["A"]
    return {"id": s["id"], "prompt": s["prompt"], "answers": answers}


def fmt_ci(x: float, ci: list[float], digits: int) -> str:
    return f"{x:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def fmt_win(w: dict | None) -> str:
    if w is None:
        return "-"
    return f"{fmt_ci(w['win_rate'], w['ci95'], 3)} ({w['wins']} / {w['ties']} / {w['losses']})"


def table(rows: list[dict]) -> list[str]:
    lines = ["| model | held-out mean tokens [95% CI] | median | empty answers | win rate vs start [95% CI] (W / T / L) "
             "| win rate vs aligned [95% CI] (W / T / L) |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['model']} | {fmt_ci(r['tokens_mean'], r['tokens_ci95'], 1)} | {r['tokens_median']:g} | {r['empty']} / "
                     f"{r['n_prompts']} | {fmt_win(r.get('vs_start'))} | {fmt_win(r.get('vs_aligned'))} |")
    return lines


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["model"].replace(" (", "\n(").replace("ExPO alpha", "ExPO\nalpha") for r in rows]
    xs = range(len(rows))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    means = [r["tokens_mean"] for r in rows]
    err = [[m - r["tokens_ci95"][0] for m, r in zip(means, rows)], [r["tokens_ci95"][1] - m for m, r in zip(means, rows)]]
    ax1.errorbar(xs, means, yerr=err, fmt="o", capsize=4)
    ax1.set_xticks(list(xs), names, fontsize=8)
    ax1.set_ylabel("held-out mean tokens (95% CI)")
    ax1.set_title("response length")
    for offset, key, color in ((-0.1, "vs_start", "C0"), (0.1, "vs_aligned", "C1")):
        pts = [(i + offset, r[key]) for i, r in enumerate(rows) if key in r]
        ax2.errorbar([p[0] for p in pts], [p[1]["win_rate"] for p in pts], fmt="o", color=color, capsize=4,
                     yerr=[[p[1]["win_rate"] - p[1]["ci95"][0] for p in pts], [p[1]["ci95"][1] - p[1]["win_rate"]
                                                                              for p in pts]], label=key.replace("_", " "))
    ax2.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax2.set_xticks(list(xs), names, fontsize=8)
    ax2.set_ylim(-0.05, 1.05)
    ax2.set_ylabel("win rate (95% CI)")
    ax2.set_title("rule judge win rate")
    ax2.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    args, out = parse_args()
    log = out / "commands.log"
    curve_dir = Path(args.curve)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    run_eval = run_eval_of(curve_dir)
    aligned = aligned_checkpoint(curve_dir, args.step)
    start = run_eval["start_model"]
    judge_yaml = out / "eval_judge.yaml"
    judge_yaml.write_text(yaml.safe_dump({"annotator": run_eval["judge"]["config"]}, sort_keys=False))
    res = compare(args, out, log, run_eval, aligned, start, eval_options(run_eval, judge_yaml))
    rows = res["rows"]
    ck_label = label_of(run_eval, str(aligned))
    wall = time.perf_counter() - t0
    desc = (f"ExPO on {aligned} (start {start}); {run_eval['prompts']['count']} held-out prompts of the run's "
            f"evaluation, judge {run_eval['judge']['name']}")
    plot(rows, out / "expo.png", f"ExPO on {curve_dir.name}/run/{aligned.name} (start {start}); "
                                 f"{run_eval['prompts']['count']} held-out prompts; judge {run_eval['judge']['name']}")
    ex = example(out, run_eval, rows, ck_label)
    summary = {"experiment": "ExPO on the rule curve", "curve": str(curve_dir), "aligned": str(aligned), "start": start,
               "alphas": args.alphas, "judge": run_eval["judge"]["name"], "run_eval": str(curve_dir / "run" / "eval" /
                                                                                     "eval.json"),
               "generation": run_eval["generation"], "prompts": run_eval["prompts"], **res, "example": ex,
               "wall_s": round(wall, 1), "loadavg_start": [round(x, 2) for x in load0],
               "loadavg_end": [round(x, 2) for x in os.getloadavg()],
               "files": {"plot": str(out / "expo.png"), "commands": str(log), "judge": str(judge_yaml)}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    same = [f"{c['model']} in {Path(c['eval']).parent.name}: {c['same_as_run_eval']} / {c['prompts']}"
            for c in res["checks"]]
    lines = [desc, "", *table(rows), "",
             "start and aligned responses identical to the run evaluation's: " + "; ".join(same),
             "ExPO responses identical in its two evaluations: " + "; ".join(
                 f"alpha {r['alpha']:g}: {r['same_responses_in_both_evals']} / {r['n_prompts']}" for r in rows[2:]),
             "", f"one held-out prompt ({ex['id']}): {ex['prompt']!r}",
             *[f"- {name}: {text!r}" for name, text in ex["answers"].items()], "",
             f"wall time: {wall / 60:.1f} min; load average at start {load0[0]:.2f}, at end {os.getloadavg()[0]:.2f} "
             f"(1 min)", f"plot: {out / 'expo.png'}"]
    (out / "summary.md").write_text("# ExPO on the rule curve\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
