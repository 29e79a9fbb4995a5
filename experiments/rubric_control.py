"""Experiment 2: the rubric controls the result. Three online runs that differ only in the rubric.

    python experiments/rubric_control.py [--rubrics helpful,helpful_short,helpful_very_short] [--rule] [--smoke]

Each run trains from the same start with the same seed, steps and prompts; only
`annotator.rubric` changes. On held-out prompts the script reports each trained model's mean
response length and its win rate against the start. `--rule` adds a run whose judge is the
transparent rule `prefer_shorter` (a callable judge, labelled as such), which shows what the
mechanism does when the preference signal is clean.
"""

from __future__ import annotations

import time

from pathlib import Path

from common import (base_parser, final_vs_start, fmt, oaif, parse_args, run_info, split_prompts, train_overrides,
                    write_summary)
from curves import curve_table, eval_run
from served_judges import judge_lines, pointwise_env, served_judges


def main() -> None:
    ap = base_parser(__doc__, "runs/experiments/rubric_control")
    ap.add_argument("--rubrics", default="helpful,helpful_short,helpful_very_short")
    ap.add_argument("--rule", action="store_true", help="also train with the callable rule prefer_shorter")
    args, out, log = parse_args(ap, default_steps=20)
    pointwise = bool(args.judge_gguf) and args.judge_readout == "pointwise"
    envs = {r: pointwise_env(r) if pointwise else None for r in args.rubrics.split(",")}  # checked before any run
    with served_judges(args, rubric="helpful"):  # a pointwise evaluation judge; training runs set their own
        experiment(args, out, log, envs)


def experiment(args, out: Path, log: Path, envs: dict) -> None:
    train_prompts, heldout = split_prompts(out, args.eval_prompts)
    t0 = time.perf_counter()
    runs = [(r, [f"annotator.rubric={r}"]) for r in args.rubrics.split(",")]
    if args.rule:
        runs.append(("rule:prefer_shorter", ["annotator.type=callable",
                                             "annotator.callable=oaif.annotators.rules:prefer_shorter"]))
    rows = []
    lines = [f"steps={args.steps}, batch={args.batch_size}, max_new_tokens={args.max_new_tokens}, "
             f"{args.eval_prompts} held-out prompts", "",
             "| training judge | mean tokens (trained) | mean tokens (start) | win rate vs start [95% CI] |",
             "| --- | --- | --- | --- |"]
    for name, extra in runs:
        d = out / name.replace(":", "_")
        oaif("train", *train_overrides(args, d, train_prompts, *extra, "logging.progress_bar=false"), log=log,
             env=envs.get(name))
        c = eval_run(args, d, heldout, log, args.eval_set, f"training judge: {name}") if args.save_every else None
        h = final_vs_start(args, d, heldout, d / "eval_vs_start", log, c)
        rows.append({"rubric": name, **h, "run": run_info(d), **({"curve": c} if c else {})})
        lines.append(f"| {name} | {h['len_a']:.1f} | {h['len_b']:.1f} | {fmt(h)} |")
    for row in rows if args.save_every else []:
        lines += ["", f"### {row['rubric']}: held-out length and win rate vs start over steps", "",
                  *curve_table(row["curve"]), "", f"plot: {row['curve']['plot']}"]
    lines += ["", *judge_lines(args), f"evaluation judge's name in eval.json: {rows[0]['judge']}",
              f"wall time: {(time.perf_counter() - t0) / 60:.1f} min"]
    write_summary(out, "Rubric controls the result", rows, lines)


if __name__ == "__main__":
    main()
