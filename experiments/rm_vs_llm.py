"""Experiment 3: reward-model feedback (RLAIF-style baseline) against LLM feedback, same budget.

    python experiments/rm_vs_llm.py [--rm-pairs 128] [--steps 20] [--smoke]

1. Train a reward model from the starting model on Anthropic HH harmless-base human labels
   (`oaif.annotators.reward_model_training.train_reward_model`, Bradley-Terry loss) and measure its agreement with
   the human labels on held-out HH pairs (`oaif annotate --against-labels`).
2. Two online runs on HH harmless prompts that differ only in the annotator: the reward model
   (`annotator.type=reward_model`) and the in-process LLM judge with the `harmless` rubric.
3. On held-out HH prompts: RM-trained vs LLM-trained, and each vs the start, judged by the LLM
   judge (harmless rubric) and by the reward model. Each judge favours the policy trained on it,
   so both views are reported.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from common import (ROOT, base_parser, eval_pair, final_checkpoint, final_vs_start, fmt, oaif, parse_args, run_info,
                    write_summary)
from curves import curve_table, eval_run
from served_judges import judge_lines, served_judges

HH = ROOT.parent / "shared" / "data" / "hh_harmless_test.jsonl.gz"


def main() -> None:
    ap = base_parser(__doc__, "runs/experiments/rm_vs_llm")
    ap.add_argument("--rm-pairs", type=int, default=128, help="HH pairs to train the reward model on")
    ap.add_argument("--rm-eval-pairs", type=int, default=200, help="held-out HH pairs to measure it on")
    ap.add_argument("--rm-max-length", type=int, default=384)
    args, out, log = parse_args(ap, default_steps=20)
    if args.smoke:
        args.rm_pairs, args.rm_eval_pairs = 4, 4
    with served_judges(args, rubric="harmless"):
        experiment(args, out, log)


def experiment(args, out: Path, log: Path) -> None:
    t0 = time.perf_counter()

    from oaif.data.hh import load_hh_pairs
    from oaif.data.preferences import save_preferences
    from oaif.annotators.reward_model_training import train_reward_model

    pairs = load_hh_pairs(HH).records
    # the shipped prompt/preference files use the first 400 dialogues: train and test the RM after them
    rm_train = pairs[400:400 + args.rm_pairs]
    rm_test = pairs[1400:1400 + args.rm_eval_pairs]
    save_preferences(out / "rm_test_pairs.jsonl", rm_test)
    rm_dir = out / "reward_model"
    print(f"$ train_reward_model({args.model!r}, {len(rm_train)} HH pairs, max_length={args.rm_max_length})", flush=True)
    t_rm = time.perf_counter()
    train_reward_model(args.model, rm_train, str(rm_dir), epochs=1, lr=1e-5, batch_size=8,
                       max_length=args.rm_max_length, seed=0)
    t_rm = time.perf_counter() - t_rm
    oaif("annotate", str(out / "rm_test_pairs.jsonl"), "--against-labels", "--set", "type=reward_model",
         "--set", f"model={rm_dir}", "--report", str(out / "rm_agreement.json"), log=log)
    oaif("annotate", str(out / "rm_test_pairs.jsonl"), "--against-labels", "--set", "rubric=harmless",
         *[x for s in args.judge_set for x in ("--set", s)], "--report", str(out / "llm_agreement.json"), log=log)
    rm_agree = json.loads((out / "rm_agreement.json").read_text())
    llm_agree = json.loads((out / "llm_agreement.json").read_text())

    from oaif.data.prompts import load_prompts
    from oaif.data.split import split_eval

    records = load_prompts(ROOT / "data/prompts/hh_harmless_prompts.jsonl").records
    train, held = split_eval(records, max(args.eval_prompts, 1) / len(records), 1234)
    train_file, held_file = out / "train_prompts.jsonl", out / "heldout_prompts.jsonl"
    train_file.write_text("".join(json.dumps({"id": r.id, "prompt": r.prompt}) + "\n" for r in train))
    held_file.write_text("".join(json.dumps({"id": r.id, "prompt": r.prompt}) + "\n" for r in held[:args.eval_prompts]))

    common = [str(ROOT / "configs/demo.yaml"), f"model.name_or_path={args.model}", f"data.path={train_file}",
              "data.eval_fraction=0", f"train.max_steps={args.steps}", f"train.batch_size={args.batch_size}",
              f"sampling.max_new_tokens={args.max_new_tokens}", f"train.save_every={args.save_every}",
              "train.keep_last=1000", "logging.progress_bar=false",
              "train.overwrite_output_dir=true",  # a rerun of the experiment starts its runs afresh
              f"optim.lr={args.lr}"]
    oaif("train", *common, f"train.output_dir={out / 'rm_run'}", "annotator.type=reward_model",
         f"annotator.model={rm_dir}", *args.train_set, log=log)
    oaif("train", *common, f"train.output_dir={out / 'llm_run'}", "annotator.rubric=harmless",
         *[f"annotator.{s}" for s in args.judge_set], *args.train_set, log=log)
    rm_ckpt, llm_ckpt = final_checkpoint(out / "rm_run"), final_checkpoint(out / "llm_run")

    rows, table = [], []
    llm_eval = ["rubric=harmless", *args.eval_set]  # the served evaluation judge when --eval-gguf is given
    llm_name = f"LLM judge ({args.eval_gguf or 'SmolLM2'}, harmless rubric)"
    if args.save_every:
        curves = {run: eval_run(args, out / run, held_file, log, llm_eval, f"{run}, judged by the {llm_name}")
                  for run in ("rm_run", "llm_run")}
        for run, c in curves.items():
            table += [f"### {run}: held-out length and win rate vs start over steps ({llm_name})", "",
                      *curve_table(c), "", f"plot: {c['plot']}", ""]
    for judge_name, sets in ((llm_name, llm_eval), ("reward model", ["type=reward_model", f"model={rm_dir}"])):
        args.eval_set = sets
        tag = "llm" if "LLM" in judge_name else "rm"
        same = curves if tag == "llm" and args.save_every else {}  # the curves' last points, same judge
        res = {
            "rm_run_vs_llm_run": eval_pair(args, rm_ckpt, llm_ckpt, held_file, out / f"eval_{tag}_rm_vs_llm", log),
            "rm_run_vs_start": final_vs_start(args, out / "rm_run", held_file, out / f"eval_{tag}_rm_vs_start", log,
                                              same.get("rm_run")),
            "llm_run_vs_start": final_vs_start(args, out / "llm_run", held_file, out / f"eval_{tag}_llm_vs_start", log,
                                               same.get("llm_run")),
        }
        rows.append({"eval_judge": judge_name, **res})
        table += [f"### judged by the {judge_name}", "", "| comparison | win rate [95% CI] | mean tokens (A / B) |",
                  "| --- | --- | --- |"]
        table += [f"| {k.replace('_', ' ')} | {fmt(h)} | {h['len_a']:.1f} / {h['len_b']:.1f} |" for k, h in res.items()]
        table.append("")

    def agreement_line(name, rep):
        ci = rep["agreement_ci95"]
        return (f"- {name}: agreement with HH human labels {rep['agreement']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] "
                f"(Wilson 95%) on {rep['judged']} held-out pairs, position consistency {rep['position_consistency']:.3f}")

    lines = [*judge_lines(args), "(the LLM run's training judge; the other run's is the reward model)", "",
             f"reward model: {args.model} + a scalar head, trained on {len(rm_train)} HH harmless-base pairs "
             f"(1 epoch, {t_rm / 60:.1f} min)", agreement_line("reward model", rm_agree),
             agreement_line("LLM training judge (harmless rubric)", llm_agree), "",
             f"online runs: steps={args.steps}, batch={args.batch_size}, max_new_tokens={args.max_new_tokens}, "
             f"{args.eval_prompts} held-out HH prompts", "", *table,
             f"wall time: {(time.perf_counter() - t0) / 60:.1f} min"]
    first = {"rm_agreement": rm_agree, "llm_agreement": llm_agree, "reward_model": str(rm_dir),
             "files": {"rm_test_pairs": str(out / "rm_test_pairs.jsonl"), "rm_agreement": str(out / "rm_agreement.json"),
                       "llm_agreement": str(out / "llm_agreement.json")},
             "runs": {"rm_run": run_info(out / "rm_run"), "llm_run": run_info(out / "llm_run")},
             **({"curves": curves} if args.save_every else {})}
    write_summary(out, "Reward-model feedback vs LLM feedback", [first, *rows], lines)


if __name__ == "__main__":
    main()
