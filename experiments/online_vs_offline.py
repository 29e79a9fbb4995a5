"""Experiment 1: online AI feedback against offline training on the same annotation budget.

    python experiments/online_vs_offline.py [--losses dpo,ipo,slic] [--steps 30] [--smoke]

(a) offline: sample one pair per prompt from the starting model for steps x batch prompts, label
    them with the judge (`oaif annotate --sample-from`), and train offline on that file;
(b) online: the same number of judged pairs, sampled from the current policy as it trains.
Same loss, steps, batch and judge. Then on held-out prompts: online vs offline, online vs start,
offline vs start (`oaif eval`, both orders, bootstrap 95% CIs). Writes summary.md/summary.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from common import (base_parser, eval_pair, final_checkpoint, fmt, oaif, parse_args, run_info, split_prompts,
                    train_overrides, write_summary)
from curves import curve_table, eval_run
from served_judges import judge_lines, served_judges


def offline_prompt_file(train_prompts: Path, n: int, out: Path, seed: int = 42) -> Path:
    """The first n prompts in the order the online run draws them (same stream, same seed)."""
    from oaif.data.prompts import load_prompts
    from oaif.data.stream import PromptStream

    stream = PromptStream(load_prompts(train_prompts).records, seed=seed)
    rows = [rec for _, rec in stream.take(n)]
    out.write_text("".join(json.dumps({"id": f"{r.id}@{i}", "prompt": r.prompt}) + "\n" for i, r in enumerate(rows)))
    return out


def main() -> None:
    ap = base_parser(__doc__, "runs/experiments/online_vs_offline")
    ap.add_argument("--losses", default="dpo", help="comma-separated: dpo,ipo,slic")
    args, out, log = parse_args(ap, default_steps=30)
    with served_judges(args, rubric="helpful"):
        experiment(args, out, log)


def experiment(args, out: Path, log: Path) -> None:
    train_prompts, heldout = split_prompts(out, args.eval_prompts)
    t_start = time.perf_counter()
    rows, lines = [], [f"steps={args.steps}, batch={args.batch_size} (= {args.steps * args.batch_size} judged pairs "
                       f"per run), max_new_tokens={args.max_new_tokens}, {args.eval_prompts} held-out prompts", ""]
    for loss in args.losses.split(","):
        d = out / loss
        prompts = offline_prompt_file(train_prompts, args.steps * args.batch_size, out / "offline_prompts.jsonl")
        prefs, annotation = d / "offline_prefs.jsonl", d / "offline_annotation.json"
        d.mkdir(parents=True, exist_ok=True)
        oaif("annotate", str(prompts), "--sample-from", args.model, "--out", str(prefs), "--report", str(annotation),
             "--max-new-tokens", str(args.max_new_tokens), *[x for s in args.judge_set for x in ("--set", s)], log=log)
        oaif("train", *train_overrides(args, d / "offline", train_prompts, "train.mode=offline",
                                       f"data.preference_path={prefs}", f"loss.type={loss}",
                                       "logging.progress_bar=false"), log=log)
        oaif("train", *train_overrides(args, d / "online", train_prompts, f"loss.type={loss}",
                                       "logging.progress_bar=false"), log=log)
        on, off = final_checkpoint(d / "online"), final_checkpoint(d / "offline")
        results = {
            "online_vs_offline": eval_pair(args, on, off, heldout, d / "eval_online_vs_offline", log),
            "online_vs_start": eval_pair(args, on, args.model, heldout, d / "eval_online_vs_start", log),
            "offline_vs_start": eval_pair(args, off, args.model, heldout, d / "eval_offline_vs_start", log),
        }
        rows.append({"loss": loss, **results, "runs": {"online": run_info(d / "online"), "offline": run_info(d / "offline")},
                     "offline_prefs": str(prefs), "offline_annotation": str(annotation)})
        lines += [f"## {loss.upper()}", "", "| comparison | win rate [95% CI] | mean tokens (A / B) |", "| --- | --- | --- |"]
        lines += [f"| {k.replace('_', ' ')} | {fmt(h)} | {h['len_a']:.1f} / {h['len_b']:.1f} |" for k, h in results.items()]
        lines += ["", f"judge: {results['online_vs_offline']['judge']}", ""]
        if args.save_every:
            curves = {kind: eval_run(args, d / kind, heldout, log, args.eval_set, f"{loss} {kind}")
                      for kind in ("online", "offline")}
            rows[-1]["curves"] = curves
            for kind, c in curves.items():
                lines += [f"### {loss.upper()} {kind}: held-out length and win rate vs start over steps", "",
                          *curve_table(c), "", f"plot: {c['plot']}", ""]
    lines += judge_lines(args)
    lines.append(f"wall time: {(time.perf_counter() - t_start) / 60:.1f} min")
    write_summary(out, "Online vs offline AI feedback", rows, lines)


if __name__ == "__main__":
    main()
