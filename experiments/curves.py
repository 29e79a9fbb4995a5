"""Curves over steps: `oaif eval --run` on a run's checkpoints, held-out length with a CI and the
win rate vs the start per step, the training samples' length from metrics.jsonl, a plot and a
summary table (`--save-every`)."""

from __future__ import annotations

import json
from pathlib import Path

from common import oaif


def curve(eval_json: Path, metrics_jsonl: Path) -> dict:
    """Per evaluated step: held-out mean tokens with a bootstrap CI over prompts, and the win rate vs
    the start (from eval.json); the training samples' mean response length per step (metrics.jsonl)."""
    from oaif.stats import bootstrap_ci

    result = json.loads(eval_json.read_text())
    boot = result["bootstrap"]
    samples = result["samples"]
    labels = sorted(result["models"], key=lambda m: result["models"][m]["step"])
    comps = {c["b" if c["a"] == "start" else "a"]: c for c in result["comparisons"]}
    rows = []
    for label in labels:
        tokens = [s["tokens"][label] for s in samples]
        ci = bootstrap_ci(tokens, boot["resamples"], boot["seed"])
        row = {"step": result["models"][label]["step"], "model": result["models"][label]["model"],
               "tokens_mean": sum(tokens) / len(tokens), "tokens_ci95": list(ci), "n_prompts": len(tokens)}
        c = comps.get(label)
        if c is not None:
            row.update(win_rate=c["win_rate"], win_ci95=c["ci95"], wins=c["wins"], ties=c["ties"],
                       losses=c["losses"], judged=c["judged"], failed=c["failed_total"])
        rows.append(row)
    records = [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line.strip()]
    train = [[r["step"], r["response_length"]] for r in records if isinstance(r.get("response_length"), (int, float))]
    return {"rows": rows, "train_response_length": train, "judge": result["judge"]["name"],
            "training_judge": result["judge"].get("training_judge")}


def plot(c: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = c["rows"]
    steps = [r["step"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot(steps, [r["tokens_mean"] for r in rows], "o-", color="C0", label="held-out, mean tokens (95% CI)")
    ax1.fill_between(steps, [r["tokens_ci95"][0] for r in rows], [r["tokens_ci95"][1] for r in rows],
                     color="C0", alpha=0.2)
    if c["train_response_length"]:
        ts, tl = zip(*c["train_response_length"])
        ax1.plot(ts, tl, "-", color="C1", alpha=0.7, lw=1, label="training samples, mean tokens")
    ax1.set_xlabel("step")
    ax1.set_ylabel("response tokens")
    ax1.legend(fontsize=8)
    ax1.set_title("response length")
    wr = [r for r in rows if "win_rate" in r]
    ax2.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax2.plot([r["step"] for r in wr], [r["win_rate"] for r in wr], "o-", color="C2")
    ax2.fill_between([r["step"] for r in wr], [r["win_ci95"][0] for r in wr], [r["win_ci95"][1] for r in wr],
                     color="C2", alpha=0.2)
    ax2.set_ylim(0, 1)
    ax2.set_xlabel("step")
    ax2.set_ylabel("win rate vs start")
    ax2.set_title(f"win rate vs start ({c['judge']})", fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def eval_run(args, run_dir: Path, heldout: Path, log: Path, judge_sets: list[str], title: str) -> dict:
    """`oaif eval --run` every checkpoint of ``run_dir`` (and the start) on the held-out prompts,
    each judged against the start; returns :func:`curve` with the plot (``run_dir/curve.png``)
    and the eval.json it was read from."""
    oaif("eval", "--run", str(run_dir), "--prompts", str(heldout), "--limit", str(args.eval_prompts),
         "--out", str(run_dir / "eval"), "--max-new-tokens", str(args.max_new_tokens), "--no-progress",
         *[x for s in judge_sets for x in ("--set", s)], log=log)
    c = curve(run_dir / "eval" / "eval.json", run_dir / "metrics.jsonl")
    png = run_dir / "curve.png"
    plot(c, png, title)
    return {**c, "eval_json": str(run_dir / "eval" / "eval.json"), "plot": str(png)}


def curve_table(c: dict) -> list[str]:
    """Markdown table of a :func:`curve`: per step, held-out mean tokens and win rate vs the start."""
    lines = ["| step | held-out mean tokens [95% CI] | win rate vs start [95% CI] | W / T / L |",
             "| --- | --- | --- | --- |"]
    for r in c["rows"]:
        wr = (f"{r['win_rate']:.3f} [{r['win_ci95'][0]:.3f}, {r['win_ci95'][1]:.3f}]" if "win_rate" in r else "-")
        wtl = f"{r['wins']} / {r['ties']} / {r['losses']}" if "win_rate" in r else "-"
        lines.append(f"| {r['step']} | {r['tokens_mean']:.1f} [{r['tokens_ci95'][0]:.1f}, {r['tokens_ci95'][1]:.1f}] "
                     f"| {wr} | {wtl} |")
    return lines
