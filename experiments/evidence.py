"""The paper's claims at the budget fixed before any run (issue 20 part 3; docs/RESULTS.md section 6).

    python experiments/evidence.py rubric       # claim 1: the property's rubric against the helpful rubric
    python experiments/evidence.py offline      # claim 2: online against offline DPO at equal judged pairs
    python experiments/evidence.py rm           # claim 3: reward-model against LLM feedback on HH prompts
    python experiments/evidence.py table        # summary.md / summary.json from what is on disk
    python experiments/evidence.py rubric --smoke --out DIR    # SmolLM2 judge, tiny budgets (a test runs it)

Training runs (OUT/<run>/), each `oaif train` on configs/demo.yaml with the sizing's settings:
LoRA r 32 (alpha 64), learning rate 3e-4 held constant after one warmup step, beta 0.1, 16 steps x
4 prompts x 4 samples of at most 128 new tokens paired all ways (24 judged pairs a step, 384 a
run), a checkpoint every 4 steps. The judge is ``--judge`` served by llama.cpp on loopback, read
``--readout`` (pointwise: a yes/no score per reply, experiments/pointwise_judge.py; pairwise:
oaif's OpenAI judge, both orders).

- ``property``: online, the property's rubric (judge_rubrics/[pointwise_]signal_<property>.yaml);
  claims 1 and 2.
- ``helpful``: online, the helpful rubric (pointwise_helpful.yaml, or oaif's ``helpful``); claim 1.
- ``offline``: claim 2. The first 64 prompts of the online run's prompt stream are answered 4
  times each by the starting policy (``oaif annotate --sample-from``), every pair of distinct
  replies of a prompt is labelled by the same judge and rubric (``oaif annotate``), and the run
  trains offline on them, 24 pairs a step for 16 steps: the same pairs, steps and settings.

Prompts: training, judge_signal.py's 315 Self-Instruct prompts (OUT/train_prompts.jsonl); held-out
(never trained on, not in the judge-signal measurement), the 80 held-out demo prompts of
``common.split_prompts`` then 48 first user turns of HH harmless-base test dialogues 1600-1999
(OUT/heldout_prompts.jsonl, ``--eval-prompts`` of them).

Evaluation (`oaif eval --run`, every checkpoint and the start, one reply per held-out prompt, the
same seed): the property by its rule (the callable ``properties:prefer_<property>`` as the judge,
so the win rate vs the start is the rule's) and the length; claim 2 adds the final online reply
against the final offline reply on each held-out prompt (the ones `oaif eval --run` sampled),
judged by the same judge's other readout.

Claim 3 (``rm``: reward-model feedback against LLM feedback on HH prompts, judged by a second reward
model trained on other HH pairs and by the LLM judge) is described in experiments/evidence_rm.py;
its files are under OUT/claim3/.

Every piece resumes: rerun the command. A run with checkpoints continues with
``train.resume=true`` (a stopped session loses at most 4 steps), a finished run or evaluation is
not redone. summary.md / summary.json are rebuilt from the files after each command.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import properties
from common import ROOT, oaif, split_prompts
from evidence_report import write_summary
from evidence_runs import OTHER, evaluate, head_to_head, judge, train
from served_judges import JUDGES

EXPERIMENTS = Path(__file__).resolve().parent


# --------------------------------------------------------------------------------------------
# prompts
# --------------------------------------------------------------------------------------------
def prompt_files(out: Path, args) -> tuple[Path, Path]:
    """OUT/train_prompts.jsonl and OUT/heldout_prompts.jsonl (written once; ``--eval-prompts`` of the
    held-out ones are used)."""
    import hh_dialogues
    import judge_signal

    train, held = out / "train_prompts.jsonl", out / "heldout_prompts.jsonl"
    if not train.exists():
        train.write_text(judge_signal.build_prompts(out / "prompt_pool", seed=0).read_text())
    if not held.exists():
        _, demo_held = split_prompts(out / "prompt_pool", judge_signal.HELD_OUT)
        rows = [json.loads(line) for line in demo_held.read_text().splitlines() if line]
        rows += hh_dialogues.evidence_heldout()
        held.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return train, held


def rule(args) -> list[str]:
    return ["type=callable", f"callable=properties:prefer_{args.property}"]


# --------------------------------------------------------------------------------------------
# the offline data: sampled once from the start, every pair of distinct replies labelled
# --------------------------------------------------------------------------------------------
def offline_pairs(args, server, log: Path) -> Path:
    from online_vs_offline import offline_prompt_file

    d = args.out / "offline_data"
    d.mkdir(parents=True, exist_ok=True)
    prefs = d / "prefs.jsonl"
    if prefs.exists() and (d / "annotation.json").exists():
        return prefs
    samples = d / "samples.jsonl"
    if not (d / "samples.report.json").exists():
        prompts = offline_prompt_file(args.train_prompts, args.steps * args.batch_size, d / "prompts.jsonl",
                                      seed=args.seed)
        oaif("annotate", str(prompts), "--sample-from", args.model, "--num-samples", str(args.num_samples),
             "--max-new-tokens", str(args.max_new_tokens), "--temperature", str(args.temperature), "--seed", "0",
             "--set", "type=callable", "--set", "callable=properties:sample_order", "--no-progress",
             "--out", str(samples), "--report", str(d / "samples.report.json"), log=log)
    replies: dict[str, dict] = {}
    for line in samples.read_text().splitlines():
        r = json.loads(line)
        entry = replies.setdefault(r["id"].rsplit(":", 1)[0], {"prompt": r["prompt"], "replies": []})
        entry["replies"] += [t for t in (r["chosen"], r["rejected"]) if t not in entry["replies"]]
    pairs = [{"id": f"{pid}:{i}-{j}", "prompt": e["prompt"], "a": e["replies"][i], "b": e["replies"][j]}
             for pid, e in replies.items() for i in range(len(e["replies"])) for j in range(i + 1, len(e["replies"]))]
    (d / "pairs.jsonl").write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    sets, env = judge(args, server, args.property, args.readout)
    oaif("annotate", str(d / "pairs.jsonl"), "--out", str(prefs), "--report", str(d / "annotation.json"),
         "--no-progress", "--batch-size", str(len(pairs)),  # one batch: a pointwise judge scores each reply once
         *[x for s in sets for x in ("--set", s)], log=log, env=env)
    return prefs


# --------------------------------------------------------------------------------------------
# the claims
# --------------------------------------------------------------------------------------------
def claim_rubric(args, server, log: Path) -> None:
    for name, rubric in (("property", args.property), ("helpful", "helpful")):
        sets, env = judge(args, server, rubric, args.readout)
        run = train(args, args.out / name, args.train_prompts, [f"annotator.{s}" for s in sets], env, log)
        evaluate(args, run, args.heldout, rule(args), log)


def claim_offline(args, server, log: Path) -> None:
    sets, env = judge(args, server, args.property, args.readout)
    online = train(args, args.out / "property", args.train_prompts, [f"annotator.{s}" for s in sets], env, log)
    evaluate(args, online, args.heldout, rule(args), log)
    prefs = offline_pairs(args, server, log)
    pairs_per_step = args.batch_size * args.num_samples * (args.num_samples - 1) // 2
    offline = train(args, args.out / "offline", args.train_prompts,
                    ["train.mode=offline", f"data.preference_path={prefs}", f"train.batch_size={pairs_per_step}"],
                    {}, log)
    evaluate(args, offline, args.heldout, rule(args), log)
    sets, env = judge(args, server, args.property, OTHER[args.readout])  # the other readout judges the result
    head_to_head(args.out / "online_vs_offline", (online, "final"), (offline, "final"), sets, log, env)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("claim", choices=("rubric", "offline", "rm", "table"))
    ap.add_argument("--out", default="experiments/results/evidence", help="output directory")
    ap.add_argument("--property", default="numbered_list", choices=properties.PROPERTIES,
                    help="the property the rubric asks for (chosen by judge_signal.py's table)")
    ap.add_argument("--readout", default="pointwise", choices=("pointwise", "pairwise"), help="training judge readout")
    ap.add_argument("--judge", default="qwen2.5-coder-1.5b", help=f"served judge: {', '.join(JUDGES)}")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="the starting policy")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=4, help="prompts a step")
    ap.add_argument("--num-samples", type=int, default=4, help="replies a prompt, paired all ways")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.9, help="configs/demo.yaml's sampling.temperature")
    ap.add_argument("--seed", type=int, default=42, help="configs/demo.yaml's train.seed (the prompt stream)")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--lora-r", type=int, default=32)
    ap.add_argument("--save-every", type=int, default=4)
    ap.add_argument("--eval-prompts", type=int, default=128, help="held-out prompts used (at most 128)")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp server threads")
    ap.add_argument("--smoke", action="store_true", help="SmolLM2 judge, 2 steps, tiny budgets")
    args = ap.parse_args(argv)
    if args.smoke:
        args.judge, args.steps, args.batch_size, args.num_samples, args.max_new_tokens = "smollm2-135m", 2, 2, 2, 16
        args.save_every, args.eval_prompts, args.lora_r = 1, 4, 4
    if not 0 < args.eval_prompts <= 128:
        ap.error(f"--eval-prompts {args.eval_prompts}: 1 to 128 (the held-out file holds 128)")
    out = Path(args.out)
    args.out = out if out.is_absolute() else ROOT / out
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "commands.log"
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(EXPERIMENTS), os.environ.get("PYTHONPATH", "")])
    if args.claim != "table":
        import judge_table as jt
        from served_judges import _import_helpers

        _import_helpers()
        from llama_server import start_llama_server

        args.train_prompts, args.heldout = prompt_files(args.out, args)
        with start_llama_server(jt.gguf_path(args.judge), n_ctx=4096, n_threads=args.threads, model_alias=args.judge,
                                startup_timeout=600, extra_args=JUDGES[args.judge]) as server:
            if args.claim == "rm":
                from evidence_rm import claim_rm

                claim_rm(args, server, log)
            else:
                (claim_rubric if args.claim == "rubric" else claim_offline)(args, server, log)
    print(write_summary(args))


if __name__ == "__main__":
    main()
