"""Curves side by side: two or more finished `rule_curve.py` runs on one plot and in one table.

    python experiments/compare_curves.py --curve "async_steps=0=runs/rule_curve_async0" \\
        --curve "async_steps=1=runs/rule_curve_async1" --out runs/async_curve

Each ``--curve LABEL=DIR`` names a directory that `rule_curve.py` wrote, or the files kept of one
in experiments/results/ (its summary.json and, for `policy_lag`, run/metrics.jsonl or metrics.jsonl). The runs must share their
held-out prompts and evaluation settings for the comparison to mean anything; the script checks
that their held-out start rows (step 0) are equal and stops with a one-line error otherwise.
Written to --out: compare.md (per step: each run's held-out mean tokens with its 95% CI and its
rule win rate vs the start with its CI), compare.json and compare.png (held-out length with the
CI bands, and the win rate vs the start, over steps).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from served_judges import fail


def read_curve(directory: Path) -> dict:
    summary = directory / "summary.json"
    if not summary.is_file():
        fail(f"{directory}: no summary.json (not a finished rule_curve.py run)")
    s = json.loads(summary.read_text())
    lags = []
    for metrics in (directory / "run" / "metrics.jsonl", directory / "metrics.jsonl"):  # a run, or its kept files
        if not metrics.is_file():
            continue
        lags = sorted({json.loads(line).get("policy_lag", 0) for line in metrics.read_text().splitlines() if line.strip()})
        break
    return {"rows": s["rows"], "description": s["description"], "wall_s": s["wall_s"], "train_s": s["train_s"],
            "train_response_length": s["train_response_length"], "policy_lag": lags}


def table(curves: dict[str, dict]) -> list[str]:
    labels = list(curves)
    head = ["step", *[f"{n}: held-out tokens [95% CI]" for n in labels], *[f"{n}: win rate vs start [95% CI]" for n in labels]]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for i, row in enumerate(curves[labels[0]]["rows"]):
        rows = [curves[n]["rows"][i] for n in labels]
        tokens = [f"{r['tokens_mean']:.1f} [{r['tokens_ci95'][0]:.1f}, {r['tokens_ci95'][1]:.1f}]" for r in rows]
        wins = [f"{r['win_rate']:.3f} [{r['win_ci95'][0]:.3f}, {r['win_ci95'][1]:.3f}]" if "win_rate" in r else "-"
                for r in rows]
        lines.append("| " + " | ".join([str(row["step"]), *tokens, *wins]) + " |")
    return lines


def plot(curves: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, (label, c) in enumerate(curves.items()):
        steps = [r["step"] for r in c["rows"]]
        ax1.plot(steps, [r["tokens_mean"] for r in c["rows"]], "o-", color=f"C{i}", label=label)
        ax1.fill_between(steps, [r["tokens_ci95"][0] for r in c["rows"]], [r["tokens_ci95"][1] for r in c["rows"]],
                         color=f"C{i}", alpha=0.15)
        wr = [r for r in c["rows"] if "win_rate" in r]
        ax2.plot([r["step"] for r in wr], [r["win_rate"] for r in wr], "o-", color=f"C{i}", label=label)
        ax2.fill_between([r["step"] for r in wr], [r["win_ci95"][0] for r in wr], [r["win_ci95"][1] for r in wr],
                         color=f"C{i}", alpha=0.15)
    ax1.set(xlabel="step", ylabel="held-out response tokens", title="held-out length (95% CI)")
    ax2.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax2.set(xlabel="step", ylabel="win rate vs start", ylim=(0, 1), title="rule win rate vs the start (95% CI)")
    for ax in (ax1, ax2):
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--curve", action="append", required=True, metavar="LABEL=DIR",
                    help="a label and a finished rule_curve.py output directory (repeat, at least two)")
    ap.add_argument("--out", required=True, help="output directory")
    args = ap.parse_args(argv)
    if len(args.curve) < 2 or any("=" not in c for c in args.curve):
        ap.error("--curve: give at least two, each LABEL=DIR")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    curves = {}
    for item in args.curve:
        label, directory = item.rsplit("=", 1)
        curves[label] = read_curve(Path(directory))
    first = next(iter(curves.values()))
    for label, c in curves.items():
        if [r["step"] for r in c["rows"]] != [r["step"] for r in first["rows"]]:
            fail(f"{label}: evaluated at other steps than {next(iter(curves))}")
        if c["rows"][0]["tokens_mean"] != first["rows"][0]["tokens_mean"]:
            fail(f"{label}: its start's held-out answers differ from {next(iter(curves))}'s (other prompts or settings)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    title = first["description"]
    plot(curves, out / "compare.png", title)
    lines = [title, "", *table(curves), ""]
    lines += [f"{label}: policy_lag {','.join(map(str, c['policy_lag']))}; training {c['train_s'] / 60:.1f} min, "
              f"wall {c['wall_s'] / 60:.1f} min" for label, c in curves.items()]
    (out / "compare.md").write_text("# Curves side by side\n\n" + "\n".join(lines) + "\n")
    (out / "compare.json").write_text(json.dumps({"curves": curves, "description": title}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
