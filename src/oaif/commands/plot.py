"""Draw a training run's metrics over its steps: PNGs and a short Markdown page.

  oaif plot RUN_DIR [--out DIR]

Reads RUN_DIR/metrics.jsonl (a run in progress too) and writes into --out (default RUN_DIR/plots):

  training.png   loss, log-ratio margin, reward accuracy, KL estimate, response length, EOS rate
  judge.png      the judge's both-order consistency, confidence (mean max(p, 1 - p)) and label mass,
                 with the thresholds under which (both) its labels count as coin flips
  pairs.png      pairs per step: used, masked (identical or tied), failed
  time.png       seconds per step: sampling, judging, update, weight push
  index.md       the plots, the run's first and last step, and the judge's numbers over the run

A plot whose metrics the run does not have (offline runs have no judge) is left out. Needs
matplotlib (`pip install 'oaif[plots]'`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

TABLE_KEYS = ("loss", "logratio_margin", "reward_accuracy", "kl", "response_length", "judge_consistency",
              "judge_confidence", "pairs_used", "time_step_s")
PICTURES = {"training": "Training", "judge": "The judge", "pairs": "Pairs", "time": "Time"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a training run's directory (train.output_dir)")
    parser.add_argument("--out", metavar="DIR", help="where to write the PNGs and index.md (default: RUN_DIR/plots)")


def load_run_metrics(run_dir: str) -> list[dict]:
    """The records of RUN_DIR/metrics.jsonl; a one-line error when there are none."""
    from oaif.errors import DataError
    from oaif.run.metrics import read_metrics

    path = Path(run_dir) / "metrics.jsonl"
    if not Path(run_dir).is_dir():
        raise DataError(f"{run_dir}: not a directory (give a run's train.output_dir)")
    if not path.is_file():
        raise DataError(f"{path}: not found (is {run_dir} a training run's directory?)")
    records = [r for r in read_metrics(path) if isinstance(r, dict) and "step" in r]
    if not records:
        raise DataError(f"{path}: no step recorded yet; nothing to plot")
    return records


def _number(value) -> str:
    from oaif.evaluation.formats import fmt

    return str(value) if isinstance(value, int) else fmt(value, 4)


def render_index(run_dir: str, records: list[dict], plots: dict[str, str]) -> str:
    """The Markdown page: the pictures, the first and last step's numbers, the judge's verdict."""
    from oaif.run.judge_noise import describe_metrics

    first, last = records[0], records[-1]
    lines = [f"# Run {run_dir}", "", f"{len(records)} steps recorded (step {first['step']} to {last['step']}), "
             f"from `{Path(run_dir) / 'metrics.jsonl'}`.", ""]
    if (judge := describe_metrics(records)) is not None:
        text, noise = judge
        lines += [f"**Judge**: {text}: " + ("**no better than coin flips**." if noise else "better than coin flips."), ""]
    keys = [k for k in TABLE_KEYS if k in first or k in last]
    lines += [f"| metric | step {first['step']} | step {last['step']} |", "| --- | --- | --- |"]
    lines += [f"| `{k}` | {_number(first.get(k))} | {_number(last.get(k))} |" for k in keys]
    for kind, title in PICTURES.items():
        if kind in plots:
            lines += ["", f"## {title}", "", f"![{title}]({plots[kind]})"]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    from oaif.errors import ConfigError
    from oaif.run.run_dir import check_output_dir

    records = load_run_metrics(args.run_dir)
    out = check_output_dir(args.out or Path(args.run_dir) / "plots", "--out")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError("oaif plot needs matplotlib: pip install 'oaif[plots]'") from None
    from oaif.evaluation.formats import write_text
    from oaif.evaluation.plots import plot_run
    from oaif.run.judge_noise import MIN_CONSISTENCY, MIN_DISTANCE

    out.mkdir(parents=True, exist_ok=True)
    plots = plot_run(records, out, {"judge_consistency": (MIN_CONSISTENCY, f"noise under {MIN_CONSISTENCY}"),
                                    "judge_confidence": (0.5 + MIN_DISTANCE, f"noise under {0.5 + MIN_DISTANCE}")})
    write_text(out / "index.md", render_index(args.run_dir, records, plots))
    print(f"plots: {', '.join(str(out / name) for name in plots.values())}")
    print(f"page: {out / 'index.md'}")
    return 0
