"""Can the loop move the policy? One online DPO run judged by the exact rule `prefer_shorter`.

    python experiments/rule_curve.py [--steps 12] [--save-every 3] [--lr 1e-3] [--eval-prompts 16] [--smoke]

The training judge is the callable rule `oaif.annotators.rules:prefer_shorter` (fewer words wins),
so the preference signal is exact and the only question is whether the update moves the policy.
The run trains LoRA adapters (default r 32, learning rate 1e-3 held constant after one warmup
step, beta 0.1) on 4 samples per prompt of up to 48 tokens paired all ways (6 pairs per prompt,
4 prompts per step), saving a checkpoint every `--save-every` steps. The defaults are the run in
docs/RESULTS.md (section 4: about 19 minutes on the shared 2-core CPU); `--train-set KEY=VALUE`
changes any other training key. Then
`oaif eval --run` samples every checkpoint and the start on held-out prompts (never trained on)
and judges each checkpoint against the start, by the same rule unless `--eval-set` says otherwise.

Written to --out: summary.json / summary.md (per checkpoint step: held-out mean response tokens
with a 95% bootstrap CI over prompts, win rate vs the start with its CI; the settings, wall time
and load average), rule_curve.png (held-out length over steps with the CI band and the training
samples' mean `response_length` from metrics.jsonl; win rate vs start over steps), commands.log,
and the run directory `run/` with its checkpoints, metrics.jsonl and `run/eval/eval.json`.
Every number in the summary is recomputed from those files.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from common import ROOT, base_parser, oaif, parse_args, split_prompts
from curves import curve, curve_table, plot

RULE = "oaif.annotators.rules:prefer_shorter"


def build_parser():
    ap = base_parser(__doc__, "runs/experiments/rule_curve")
    ap.set_defaults(batch_size=4, max_new_tokens=48, lr=1e-3, eval_prompts=16, save_every=3)
    ap.add_argument("--num-samples", type=int, default=4, help="responses per prompt (sampling.num_samples)")
    ap.add_argument("--pairing", default="all", help="sampling.pairing (all: every pair of the samples)")
    ap.add_argument("--beta", type=float, default=0.1, help="loss.beta")
    ap.add_argument("--lora-r", type=int, default=32, help="LoRA rank (alpha = 2r); 0 = full fine-tuning")
    return ap


def train_args(args, run_dir: Path, train_prompts: Path) -> list[str]:
    lora = (["model.lora.enabled=true", f"model.lora.r={args.lora_r}", f"model.lora.alpha={2 * args.lora_r}"]
            if args.lora_r > 0 else ["model.lora.enabled=false"])
    return [str(ROOT / "configs" / "demo.yaml"), f"model.name_or_path={args.model}", f"data.path={train_prompts}",
            "data.eval_fraction=0", f"train.max_steps={args.steps}", f"train.batch_size={args.batch_size}",
            f"train.output_dir={run_dir}", f"train.save_every={args.save_every}", "train.keep_last=1000",
            "train.overwrite_output_dir=true",
            f"sampling.max_new_tokens={args.max_new_tokens}", f"sampling.num_samples={args.num_samples}",
            f"sampling.pairing={args.pairing}", f"optim.lr={args.lr}", "optim.scheduler=constant",
            "optim.warmup_steps=1", f"loss.beta={args.beta}",
            "annotator.type=callable", f"annotator.callable={RULE}", *lora,
            *[f"annotator.{s}" for s in args.judge_set], *args.train_set, "logging.progress_bar=false"]


def eval_args(args, run_dir: Path, heldout: Path) -> list[str]:
    judge = args.eval_set or ["type=callable", f"callable={RULE}"]
    return ["eval", "--run", str(run_dir), "--prompts", str(heldout), "--limit", str(args.eval_prompts),
            "--out", str(run_dir / "eval"), "--max-new-tokens", str(args.max_new_tokens), "--no-progress",
            *[x for s in judge for x in ("--set", s)]]


def main() -> None:
    args, out, log = parse_args(build_parser(), default_steps=12)
    if args.smoke:
        args.steps, args.save_every = 2, 1
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    train_prompts, heldout = split_prompts(out, args.eval_prompts)
    run_dir = out / "run"
    oaif("train", *train_args(args, run_dir, train_prompts), log=log)
    t_train = time.perf_counter() - t0
    oaif(*eval_args(args, run_dir, heldout), log=log)
    wall = time.perf_counter() - t0
    c = curve(run_dir / "eval" / "eval.json", run_dir / "metrics.jsonl")
    settings = {k: getattr(args, k) for k in ("model", "steps", "batch_size", "num_samples", "pairing", "max_new_tokens",
                                              "lr", "beta", "lora_r", "save_every", "eval_prompts", "train_set")}
    pairs = args.num_samples * (args.num_samples - 1) // 2 if args.pairing == "all" else args.num_samples // 2
    desc = (f"rule judge prefer_shorter; {'LoRA r=%d' % args.lora_r if args.lora_r else 'full fine-tuning'}, "
            f"lr {args.lr:g}, beta {args.beta:g}; {args.steps} steps x {args.batch_size} prompts x {pairs} pairs; "
            f"max {args.max_new_tokens} new tokens; {args.eval_prompts} held-out prompts")
    png = out / "rule_curve.png"
    plot(c, png, desc)
    first, last = c["rows"][0], c["rows"][-1]
    summary = {"experiment": "rule curve", "settings": settings, "description": desc, **c,
               "files": {"eval_json": str(run_dir / "eval" / "eval.json"), "metrics": str(run_dir / "metrics.jsonl"),
                         "plot": str(png), "commands": str(log)},
               "wall_s": round(wall, 1), "train_s": round(t_train, 1),
               "loadavg_start": [round(x, 2) for x in load0], "loadavg_end": [round(x, 2) for x in os.getloadavg()]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    lines = [desc, "", *curve_table(c)]
    tr = c["train_response_length"]
    lines += ["", f"held-out mean tokens: {first['tokens_mean']:.1f} at the start -> {last['tokens_mean']:.1f} "
                  f"at step {last['step']}",
              f"training samples' mean tokens: step {tr[0][0]} {tr[0][1]:.1f} -> step {tr[-1][0]} {tr[-1][1]:.1f}"
              if tr else "training samples' mean tokens: none logged",
              f"evaluation judge: {c['judge']}; training judge: {c['training_judge']}",
              f"wall time: {wall / 60:.1f} min (training {t_train / 60:.1f} min); load average at start "
              f"{load0[0]:.2f}, at end {os.getloadavg()[0]:.2f} (1 min)", f"plot: {png}"]
    (out / "summary.md").write_text("# Rule curve: prefer_shorter\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
