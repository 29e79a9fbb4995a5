"""The evaluation report: ``report.md`` (Markdown) and PNG plots, from :mod:`oaif.evaluation.evaluate`'s result.

Plots (matplotlib, Agg canvas, imported only here and only when a report is written):

* ``win_rate_over_steps.png``  run mode: win rate against the start model per checkpoint step,
  with its bootstrap 95% band and the mean P(better);
* ``length_over_steps.png``    run mode: response length (tokens and characters) per step,
  mean with the p10-p90 band;
* ``training_curves.png``      run mode: loss, margin, reward accuracy, KL, judge consistency, ...
  from the run's ``metrics.jsonl`` (whichever keys it has);
* ``win_rate.png``             two-model mode: win rate and mean P(A better) with their CIs;
* ``lengths.png``              histograms of response lengths (A and B; or the start model and the
  last checkpoint).

Without matplotlib (``pip install 'oaif[plots]'``) the report is written without plots and says so.

The number formats (:func:`fmt`, :func:`fmt_ci`, :func:`fmt_counts`) and the atomic file writers
(:func:`write_text`, :func:`write_json`) are also what ``oaif annotate`` uses for its summary and
``--report``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from oaif.stats import mean

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")

# metrics.jsonl key -> (panel title, y-axis label)
TRAINING_PANELS = {
    "loss": ("Loss", "loss (per pair)"),
    "logratio_margin": ("Log-ratio margin (chosen - rejected)", "rho (nats)"),
    "reward_accuracy": ("Reward accuracy", "fraction of pairs with rho > 0"),
    "kl": ("KL estimate to the reference", "nats per response"),
    "judge_consistency": ("Judge consistency", "fraction of pairs, both orders agree"),
    "judge_confidence": ("Judge confidence", "mean max(p, 1 - p)"),
    "response_length": ("Response length (training samples)", "tokens"),
    "eos_rate": ("EOS rate (training samples)", "fraction ending with EOS"),
    "pairs_failed": ("Failed judgments", "pairs per step"),
}


def fmt(x: Any, digits: int = 3) -> str:
    """A number as the report writes it (``n/a`` for None); win rates use 3 decimals."""
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if math.isnan(x):
            return "n/a"
        return f"{x:.{digits}f}"
    return str(x)


def fmt_ci(ci: Sequence[float] | None, digits: int = 3) -> str:
    return f"[{fmt(ci[0], digits)}, {fmt(ci[1], digits)}]" if ci else "n/a"


def fmt_counts(c: dict) -> str:
    """Counts by reason as ``reason n, reason n`` (``none`` when empty)."""
    return ", ".join(f"{k} {v}" for k, v in c.items()) if c else "none"


def write_text(path: str | Path, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` through a temporary file renamed into place (parents created)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(p)


def write_json(path: str | Path, data: dict) -> None:
    """Write ``data`` as indented UTF-8 JSON, atomically (:func:`write_text`)."""
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def _fence(text: str, limit: int = 600) -> str:
    """``text`` (cut at ``limit`` characters) in a code fence longer than any backtick run inside."""
    body = text if len(text) <= limit else text[:limit] + f" [... {len(text) - limit} more characters]"
    longest = max((len(run) for run in body.split("\n") for run in _backtick_runs(run)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{body if body else '(empty response)'}\n{fence}"


def _backtick_runs(line: str) -> list[str]:
    runs, cur = [], ""
    for ch in line:
        if ch == "`":
            cur += ch
        elif cur:
            runs.append(cur)
            cur = ""
    if cur:
        runs.append(cur)
    return runs


def _short(model: str, limit: int = 40) -> str:
    """A model path shortened for a plot title (its last two path parts, cut at ``limit``)."""
    parts = Path(model).parts
    name = "/".join(parts[-2:]) if len(parts) > 1 else model
    return name if len(name) <= limit else "..." + name[-(limit - 3):]


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n\n".join(f"{m.get('role', '?').capitalize()}: {m.get('content', '')}" for m in prompt)


# --------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------
def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> str:
    fig.savefig(path, format="png")
    return path.name


def plot_win_rate_over_steps(result: dict, path: Path) -> str:
    curve = [c for c in result["comparisons"] if c.get("step") is not None]
    steps = [c["step"] for c in curve]
    fig = _figure(7.5, 4.5)
    ax = fig.add_subplot()
    ax.axhline(0.5, color="0.5", ls=":", lw=1.2, label="0.5 = no better than the start")
    pts = [(c["step"], c["win_rate"], c["ci95"]) for c in curve if c["win_rate"] is not None]
    if pts:
        xs = [0] + [p[0] for p in pts]
        ys = [0.5] + [p[1] for p in pts]
        lo = [0.5] + [p[2][0] for p in pts]
        hi = [0.5] + [p[2][1] for p in pts]
        ax.fill_between(xs, lo, hi, color=COLORS[0], alpha=0.18, lw=0, label="95% bootstrap CI")
        ax.plot(xs, ys, "-o", color=COLORS[0], lw=2, ms=6, label="win rate (ties count 1/2)")
        ax.plot([0], [0.5], "o", color="white", mec=COLORS[0], ms=6, zorder=3)
        if len(pts) <= 12:
            for x, y, _ in pts:
                ax.annotate(f"{y:.2f}", (x, y), textcoords="offset points", xytext=(0, 8), ha="center",
                            fontsize=9, color=COLORS[0])
    mp = [(c["step"], c["mean_prob"]) for c in curve if c["mean_prob"] is not None]
    if mp:
        ax.plot([0] + [p[0] for p in mp], [0.5] + [p[1] for p in mp], "--s", color=COLORS[1], lw=1.3, ms=4,
                label="mean P(checkpoint better)")
    n = result["prompts"]["count"]
    ax.set_title(f"Checkpoints vs start model: win rate on {n} held-out prompts\n"
                 f"judge: {result['judge']['name']}", fontsize=11)
    ax.set_xlabel("training step (step 0 = start model, open marker)")
    ax.set_ylabel("win rate against the start model")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlim(-0.05 * max(steps + [1]), max(steps + [1]) * 1.05)
    if steps and len(steps) <= 12:
        ax.set_xticks(sorted({0, *steps}))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8, framealpha=0.9)
    return _save(fig, path)


def plot_length_over_steps(result: dict, path: Path) -> str:
    models = sorted(result["models"].values(), key=lambda m: m["step"])
    steps = [m["step"] for m in models]
    fig = _figure(9.5, 4.0)
    for i, (key, unit) in enumerate((("tokens", "tokens"), ("chars", "characters"))):
        ax = fig.add_subplot(1, 2, i + 1)
        mean = [m[key]["mean"] for m in models]
        med = [m[key]["median"] for m in models]
        lo = [m[key]["p10"] for m in models]
        hi = [m[key]["p90"] for m in models]
        ax.fill_between(steps, lo, hi, color=COLORS[2], alpha=0.18, lw=0, label="p10 - p90")
        ax.plot(steps, mean, "-o", color=COLORS[2], lw=2, ms=5, label="mean")
        ax.plot(steps, med, "--", color=COLORS[2], lw=1.2, label="median")
        ax.set_title(f"Response length in {unit}", fontsize=11)
        ax.set_xlabel("training step (0 = start model)")
        ax.set_ylabel(f"{unit} per response")
        ax.set_ylim(bottom=0)
        if len(steps) <= 12:
            ax.set_xticks(steps)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if result["generation"].get("max_new_tokens"):
        fig.axes[0].axhline(result["generation"]["max_new_tokens"], color="0.5", ls=":", lw=1)
    fig.suptitle(f"Held-out responses ({result['prompts']['count']} prompts, "
                 f"temperature {result['generation']['temperature']}, "
                 f"max {result['generation']['max_new_tokens']} new tokens)", fontsize=11)
    return _save(fig, path)


def plot_lengths(result: dict, labels: Sequence[str], path: Path) -> str:
    fig = _figure(9.5, 4.0)
    for i, (key, unit) in enumerate((("tokens", "tokens"), ("chars", "characters"))):
        ax = fig.add_subplot(1, 2, i + 1)
        for c, label in enumerate(labels):
            h = result["models"][label][key]["histogram"]
            edges, counts = h["edges"], h["counts"]
            ax.stairs(counts, edges, color=COLORS[c % len(COLORS)], lw=2, label=f"{label} (mean "
                      f"{fmt(result['models'][label][key]['mean'], 1)})")
            mean = result["models"][label][key]["mean"]
            if mean is not None:
                ax.axvline(mean, color=COLORS[c % len(COLORS)], ls="--", lw=1)
        ax.set_title(f"Response length in {unit}", fontsize=11)
        ax.set_xlabel(f"{unit} per response (dashed: mean)")
        ax.set_ylabel("responses")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Length distribution on {result['prompts']['count']} prompts", fontsize=11)
    return _save(fig, path)


def plot_win_rate(result: dict, path: Path) -> str:
    c = result["comparisons"][0]
    fig = _figure(7.5, 2.8)
    ax = fig.add_subplot()
    rows = [("win rate\n(ties count 1/2)", c["win_rate"], c["ci95"]), ("mean P(A better)", c["mean_prob"],
                                                                      c["mean_prob_ci95"])]
    for y, (name, value, ci) in enumerate(rows):
        if value is None:
            continue
        err = [[value - ci[0]], [ci[1] - value]] if ci else None
        ax.errorbar([value], [y], xerr=err, fmt="o", color=COLORS[y], capsize=6, ms=8, lw=2)
        ax.annotate(f"{value:.3f}  CI {fmt_ci(ci)}", (value, y), textcoords="offset points", xytext=(0, 10),
                    ha="center", fontsize=9)
    ax.axvline(0.5, color="0.5", ls=":", lw=1.2)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows])
    ax.set_ylim(-0.6, len(rows) - 0.3)
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"{c['a']} against {c['b']} (0.5 = even; 95% bootstrap CI over prompts)")
    names = {label: _short(result["models"][label]["model"]) for label in (c["a"], c["b"])}
    ax.set_title(f"{c['a']} = {names[c['a']]}  vs  {c['b']} = {names[c['b']]}\n"
                 f"{c['judged']} judged prompts, judge: {result['judge']['name']}", fontsize=10)
    ax.grid(alpha=0.3, axis="x")
    return _save(fig, path)


def plot_training_curves(metrics: list[dict], path: Path, eval_steps: Sequence[int] = ()) -> str | None:
    keys = [k for k in TRAINING_PANELS if any(isinstance(m.get(k), (int, float)) for m in metrics)]
    if not keys:
        return None
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig = _figure(4.0 * cols, 2.9 * rows)
    for i, key in enumerate(keys):
        ax = fig.add_subplot(rows, cols, i + 1)
        pts = [(m["step"], m[key]) for m in metrics if isinstance(m.get(key), (int, float)) and "step" in m]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        color = COLORS[i % len(COLORS)]
        if len(xs) >= 30:  # noisy per-step values: faint raw line, bold moving average
            w = max(5, len(xs) // 20)
            ax.plot(xs, ys, "-", color=color, lw=0.8, alpha=0.35, label="per step")
            avg = [mean(ys[max(0, k - w + 1):k + 1]) for k in range(len(ys))]
            ax.plot(xs, avg, "-", color=color, lw=1.8, label=f"mean of last {w} steps")
            if i == 0:
                ax.legend(fontsize=7)
        else:
            ax.plot(xs, ys, "-", color=color, lw=1.5, marker="o", ms=3)
        ax.ticklabel_format(axis="y", useOffset=False)
        for s in eval_steps:
            ax.axvline(s, color="0.6", ls=":", lw=0.8)
        title, ylabel = TRAINING_PANELS[key]
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("Training curves from metrics.jsonl (dotted: evaluated checkpoints)", fontsize=11)
    return _save(fig, path)


def make_plots(result: dict, out_dir: Path, metrics: list[dict] | None = None) -> dict[str, str]:
    """Draw every plot that fits the result; returns {kind: file name}. Empty without matplotlib."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return {}
    plots: dict[str, str] = {}
    if result["mode"] == "run":
        if result["comparisons"]:
            plots["win_rate"] = plot_win_rate_over_steps(result, out_dir / "win_rate_over_steps.png")
        plots["length"] = plot_length_over_steps(result, out_dir / "length_over_steps.png")
        last = result["comparisons"][-1]["a"] if result["comparisons"] else None
        plots["lengths"] = plot_lengths(result, ["start"] + ([last] if last else []), out_dir / "lengths.png")
        if metrics:
            name = plot_training_curves(metrics, out_dir / "training_curves.png",
                                        [c["step"] for c in result["comparisons"]])
            if name:
                plots["training"] = name
    else:
        plots["win_rate"] = plot_win_rate(result, out_dir / "win_rate.png")
        plots["lengths"] = plot_lengths(result, list(result["models"]), out_dir / "lengths.png")
    return plots


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------
def _header(result: dict) -> list[str]:
    j, p, g, b = result["judge"], result["prompts"], result["generation"], result["bootstrap"]
    if result["mode"] == "run":
        title = f"# Evaluation of run `{result['run']}`"
        what = (f"Each checkpoint against the run's starting model `{result['start_model']}` "
                f"(win rate of the checkpoint; 0.5 = no better than the start).")
    else:
        a, bb = list(result["models"])
        title = f"# Evaluation: {a} vs {bb}"
        what = (f"Model {a} = `{result['models'][a]['model']}` against model {bb} = "
                f"`{result['models'][bb]['model']}` (win rate of {a}).")
    source = p.get("kind", "prompts")
    if p.get("path"):
        source += f" `{p['path']}`"
    if p.get("kind") == "run eval split":
        source += f" (eval_fraction {p['eval_fraction']}, seed {p['seed']}, of {p['split_of']} usable prompts)"
    lines = [title, "", what, "",
             f"- **Judge:** `{j['name']}` ({j['description']})"]
    if "training_judge" in j:
        same = "the same judge" if j.get("same_as_training") else "a different judge"
        lines.append(f"- **Training judge:** {j['training_judge']} ({same})")
    lines += [
        f"- **Prompts:** {p['count']} from {source}"
        + (f", first {p['limit']}" if p.get("limit") else "")
        + (f"; skipped: {fmt_counts(p['skipped'])}" if p.get("skipped") else ""),
        f"- **Generation:** one response per prompt and model, temperature {g['temperature']}, top-p {g['top_p']}, "
        f"at most {g['max_new_tokens']} new tokens, seed {g['seed']} (the same for every model), "
        f"chat template {'on' if g['chat_template'] else 'off'}"
        + (f", system prompt {g['system_prompt']!r}" if g.get("system_prompt") else ""),
        "- **Win rate:** per prompt, the judge's P(A better) p scores 1 if p > 0.5, 1/2 if p = 0.5, 0 otherwise; "
        "identical responses are ties without asking the judge; failed judgments are left out and counted. "
        "A's response is shown first on even prompts and second on odd ones.",
        f"- **95% CI:** {b['method']}, {b['resamples']} resamples, seed {b['seed']}.",
        "",
    ]
    return lines


def _comparison_table(result: dict) -> list[str]:
    run = result["mode"] == "run"
    head = "| step | checkpoint | " if run else "| A | B | "
    lines = [head + "win rate | 95% CI | mean P(better) | 95% CI | wins / ties / losses | identical | failed | "
                    "judge consistency |",
             "|" + "---|" * 10]
    for c in result["comparisons"]:
        first = f"| {c['step']} | {c['a']} | " if run else f"| {c['a']} | {c['b']} | "
        lines.append(first + f"{fmt(c['win_rate'])} | {fmt_ci(c['ci95'])} | {fmt(c['mean_prob'])} | "
                     f"{fmt_ci(c['mean_prob_ci95'])} | {c['wins']} / {c['ties']} / {c['losses']} | {c['identical']} | "
                     f"{c['failed_total']}{' (' + fmt_counts(c['failed']) + ')' if c['failed'] else ''} | "
                     f"{fmt(c['judge_consistency'])} |")
    return lines


def _length_table(result: dict) -> list[str]:
    run = result["mode"] == "run"
    lines = [("| step " if run else "") + "| model | tokens mean | median | p10 | p90 | chars mean | median | p10 | p90 | "
             "EOS rate |", "|" + "---|" * (11 if run else 10)]
    models = sorted(result["models"].items(), key=lambda kv: kv[1].get("step", 0))
    for label, m in models:
        t, c = m["tokens"], m["chars"]
        lines.append((f"| {m['step']} " if run else "") + f"| {label} | {fmt(t['mean'], 1)} | {fmt(t['median'], 1)} | "
                     f"{fmt(t['p10'], 1)} | {fmt(t['p90'], 1)} | {fmt(c['mean'], 1)} | {fmt(c['median'], 1)} | "
                     f"{fmt(c['p10'], 1)} | {fmt(c['p90'], 1)} | {fmt(m['eos_rate'], 2)} |")
    return lines


def _samples(result: dict, n: int) -> list[str]:
    samples = result["samples"][:n]
    if not samples:
        return []
    lines = ["## Samples", "",
             f"The first {len(samples)} of {len(result['samples'])} prompts (long texts cut; every prompt, "
             f"response and judgment is in `eval.json`).", ""]
    for s in samples:
        lines += [f"### Prompt `{s['id']}`", "", _fence(_prompt_text(s["prompt"]), 500), ""]
        verdicts = {row["a"]: row for row in s["judgments"]}
        for label, text in s["responses"].items():
            note = ""
            row = verdicts.get(label)
            if row is not None:
                if row["prob_a"] is None:
                    note = f" -- judgment failed ({row['failure']})"
                else:
                    outcome = {1.0: "win", 0.5: "tie", 0.0: "loss"}[row["score"]]
                    how = "identical responses" if row["identical"] else f"P({label} better) = {row['prob_a']:.3f}"
                    note = f" -- {outcome} against {row['b']} ({how})"
            lines += [f"**{label}** ({s['tokens'][label]} tokens){note}", "", _fence(text), ""]
    return lines


def render_markdown(result: dict, plots: dict[str, str], n_samples: int = 3) -> str:
    lines = _header(result)
    if result["mode"] == "run":
        lines += ["## Win rate against the start", ""] + _comparison_table(result) + [""]
        if "win_rate" in plots:
            lines += [f"![Win rate over training steps]({plots['win_rate']})", ""]
        lines += ["## Response length", ""] + _length_table(result) + [""]
        if "length" in plots:
            lines += [f"![Response length over training steps]({plots['length']})", ""]
        if "lengths" in plots:
            lines += [f"![Length distributions]({plots['lengths']})", ""]
        tr = result.get("training")
        lines += ["## Training curves", ""]
        if tr:
            last = {k: v[-1][1] for k, v in tr["series"].items() if v}
            lines += [f"From `{tr['metrics']}` ({tr['steps']} steps). Last step: "
                      + ", ".join(f"{k} {fmt(v, 4)}" for k, v in last.items()) + ".", ""]
            if "training" in plots:
                lines += [f"![Training curves]({plots['training']})", ""]
        else:
            lines += ["The run has no metrics.jsonl.", ""]
    else:
        lines += ["## Win rate", ""] + _comparison_table(result) + [""]
        if "win_rate" in plots:
            lines += [f"![Win rate]({plots['win_rate']})", ""]
        lines += ["## Response length", ""] + _length_table(result) + [""]
        if "lengths" in plots:
            lines += [f"![Length distributions]({plots['lengths']})", ""]
    if not plots:
        lines += ["(No plots: matplotlib is not installed; `pip install 'oaif[plots]'`.)", ""]
    lines += _samples(result, n_samples)
    lines += [f"Evaluated in {result.get('seconds', 0):.1f} s.", ""]
    return "\n".join(lines)


def write_report(result: dict, out_dir: str | Path, metrics: list[dict] | None = None, n_samples: int = 3) -> dict:
    """Write the plots and ``report.md`` into ``out_dir``; returns the file names written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = make_plots(result, out, metrics)
    write_text(out / "report.md", render_markdown(result, plots, n_samples=n_samples))
    return {"report": "report.md", "eval": "eval.json", "plots": plots}
