"""The evaluation's PNG plots, drawn from :mod:`oaif.evaluation.evaluate`'s result, and a run's metrics.

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

``oaif plot RUN_DIR`` (:func:`plot_run`) draws a run's ``metrics.jsonl`` with the same functions:
``training.png``, ``judge.png``, ``pairs.png``, ``time.png``.

Without matplotlib (``pip install 'oaif[plots]'``) the report is written without plots and says so.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from oaif.evaluation.formats import fmt, fmt_ci, short_model
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
    names = {label: short_model(result["models"][label]["model"]) for label in (c["a"], c["b"])}
    ax.set_title(f"{c['a']} = {names[c['a']]}  vs  {c['b']} = {names[c['b']]}\n"
                 f"{c['judged']} judged prompts, judge: {result['judge']['name']}", fontsize=10)
    ax.grid(alpha=0.3, axis="x")
    return _save(fig, path)


def plot_training_curves(metrics: list[dict], path: Path, eval_steps: Sequence[int] = (),
                         panels: dict[str, tuple[str, str]] = TRAINING_PANELS,
                         title: str = "Training curves from metrics.jsonl (dotted: evaluated checkpoints)",
                         lines: dict[str, tuple[float, str]] | None = None) -> str | None:
    """One panel per key of ``panels`` that ``metrics`` has; ``lines``: key -> (y, label) of a dashed
    horizontal line in its panel (a threshold)."""
    keys = [k for k in panels if any(isinstance(m.get(k), (int, float)) for m in metrics)]
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
        if lines and key in lines:
            ax.axhline(lines[key][0], color="0.3", ls="--", lw=1, label=lines[key][1])
            ax.legend(fontsize=7)
        panel_title, ylabel = panels[key]
        ax.set_title(panel_title, fontsize=10)
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def plot_stacked(metrics: list[dict], keys: dict[str, str], path: Path, title: str, ylabel: str,
                 integers: bool = False) -> str | None:
    """Stacked bars per step of the ``keys`` (key -> legend label) that ``metrics`` has."""
    keys = {k: label for k, label in keys.items() if any(isinstance(m.get(k), (int, float)) for m in metrics)}
    if not keys:
        return None
    steps = [m.get("step", i + 1) for i, m in enumerate(metrics)]
    fig = _figure(8.0, 3.8)
    ax = fig.add_subplot()
    bottom = [0.0] * len(metrics)
    for i, (key, label) in enumerate(keys.items()):
        values = [float(m.get(key) or 0) for m in metrics]
        ax.bar(steps, values, bottom=bottom, width=0.8, color=COLORS[i % len(COLORS)], label=label)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    if integers:
        from matplotlib.ticker import MaxNLocator

        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    return _save(fig, path)


# `oaif plot RUN_DIR`: metrics.jsonl over the steps, one PNG per concern
RUN_PANELS = {k: TRAINING_PANELS[k] for k in ("loss", "logratio_margin", "reward_accuracy", "kl",
                                              "response_length", "eos_rate")}
JUDGE_PANELS = {**{k: TRAINING_PANELS[k] for k in ("judge_consistency", "judge_confidence")},
                "judge_label_mass": ("Judge label mass", "probability on the two label tokens")}
PAIR_KEYS = {"pairs_used": "used (trained on)", "pairs_masked": "masked (identical or tied)",
             "pairs_failed": "failed judgments"}
TIME_KEYS = {"time_sample_s": "sampling", "time_annotate_s": "judging", "time_update_s": "update",
             "time_weight_sync_s": "weight push (vLLM)"}


def plot_run(metrics: list[dict], out_dir: Path, judge_lines: dict[str, tuple[float, str]]) -> dict[str, str]:
    """``oaif plot``'s PNGs in ``out_dir``: {what: file name} for each plot that the metrics have values for.
    ``judge_lines``: the noise thresholds drawn in the judge panels."""
    plots = {
        "training": plot_training_curves(metrics, out_dir / "training.png", panels=RUN_PANELS,
                                         title="Training: loss, margin, KL and the sampled responses"),
        "judge": plot_training_curves(metrics, out_dir / "judge.png", panels=JUDGE_PANELS, lines=judge_lines,
                                      title="The judge: its labels are coin flips when both curves run under "
                                            "their dashed lines"),
        "pairs": plot_stacked(metrics, PAIR_KEYS, out_dir / "pairs.png", "Pairs per step", "pairs", integers=True),
        "time": plot_stacked(metrics, TIME_KEYS, out_dir / "time.png", "Seconds per step, by phase", "seconds"),
    }
    return {k: v for k, v in plots.items() if v}


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
