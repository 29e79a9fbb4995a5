"""The paper's claims at the budget fixed before any run (issue 20 part 3; docs/RESULTS.md section 6).

    python experiments/evidence.py rubric       # claim 1: the property's rubric against the helpful rubric
    python experiments/evidence.py offline      # claim 2: online against offline DPO at equal judged pairs
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
from served_judges import JUDGES, POINTWISE, RUBRICS, served_sets

EXPERIMENTS = Path(__file__).resolve().parent
OTHER = {"pointwise": "pairwise", "pairwise": "pointwise"}


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


# --------------------------------------------------------------------------------------------
# judges
# --------------------------------------------------------------------------------------------
def rubric_file(args, rubric: str, readout: str) -> Path | str:
    """The rubric for ``rubric`` = the property or "helpful", in ``readout``'s form."""
    import judge_signal

    if rubric == "helpful":
        return RUBRICS / "pointwise_helpful.yaml" if readout == "pointwise" else "helpful"
    return judge_signal.rubric_path(rubric, readout, args.out, properties.SHORT_WORDS)


def judge(args, server, rubric: str, readout: str) -> tuple[list[str], dict[str, str]]:
    """Annotator keys (``--set`` / ``annotator.`` form) and environment of the served judge."""
    path = rubric_file(args, rubric, readout)
    if readout == "pointwise":
        return list(POINTWISE), {"OAIF_POINTWISE_URL": server.base_url, "OAIF_POINTWISE_MODEL": args.judge,
                                 "OAIF_POINTWISE_RUBRIC": str(path)}
    return served_sets(server.base_url, args.judge) + [f"rubric={path}"], {}


def rule(args) -> list[str]:
    return ["type=callable", f"callable=properties:prefer_{args.property}"]


# --------------------------------------------------------------------------------------------
# runs
# --------------------------------------------------------------------------------------------
def settings(args, run_dir: Path, train_prompts: Path) -> list[str]:
    r = args.lora_r
    return [str(ROOT / "configs" / "demo.yaml"), f"model.name_or_path={args.model}", f"data.path={train_prompts}",
            "data.eval_fraction=0", f"train.max_steps={args.steps}", f"train.batch_size={args.batch_size}",
            f"train.output_dir={run_dir}", f"train.save_every={args.save_every}", "train.keep_last=1000",
            f"sampling.max_new_tokens={args.max_new_tokens}", f"sampling.num_samples={args.num_samples}",
            "sampling.pairing=all", f"optim.lr={args.lr}", "optim.scheduler=constant", "optim.warmup_steps=1",
            f"loss.beta={args.beta}", "model.lora.enabled=true", f"model.lora.r={r}", f"model.lora.alpha={2 * r}",
            "logging.progress_bar=false"]


def finished(run_dir: Path, steps: int) -> bool:
    latest = run_dir / "latest"
    return latest.exists() and latest.read_text().strip() == f"checkpoint-{steps}"


def train(args, name: str, overrides: list[str], env: dict[str, str], log: Path) -> Path:
    """Train run ``name`` (resuming it if it has a checkpoint); nothing when it is finished."""
    run_dir = args.out / name
    if finished(run_dir, args.steps):
        print(f"# {name}: finished", flush=True)
        return run_dir
    again = ["train.resume=true"] if (run_dir / "latest").exists() else ["train.overwrite_output_dir=true"]
    oaif("train", *settings(args, run_dir, args.train_prompts), *overrides, *again, log=log, env=env)
    return run_dir


def evaluate(args, run_dir: Path, log: Path) -> Path:
    """`oaif eval --run` with the property's rule as the judge: every checkpoint and the start."""
    result = run_dir / "eval" / "eval.json"
    if not result.exists():
        oaif("eval", "--run", str(run_dir), "--prompts", str(args.heldout), "--limit", str(args.eval_prompts),
             "--out", str(run_dir / "eval"), "--max-new-tokens", str(args.max_new_tokens), "--no-progress",
             *[x for s in rule(args) for x in ("--set", s)], log=log)
    return result


def head_to_head(args, server, a: Path, b: Path, name: str, log: Path) -> Path:
    """Run ``a``'s final reply against run ``b``'s on each held-out prompt, by the judge's other readout.

    The replies are the ones both runs' `oaif eval --run` sampled (same prompts, seed and settings, as
    `oaif eval A B` would sample them), so no checkpoint is needed: ``a``'s reply is written as
    ``chosen`` and `oaif annotate --against-labels` gives per prompt whether the judge prefers it
    (1, a tie 1/2, 0). Identical replies are ties without a judge call (OUT/<name>/identical.json)."""
    d = args.out / name
    report = d / "report.json"
    if report.exists():
        return report
    d.mkdir(parents=True, exist_ok=True)
    ra, rb = (json.loads((run / "eval" / "eval.json").read_text()) for run in (a, b))
    fa, fb = final_label(ra), final_label(rb)
    if [x["id"] for x in ra["samples"]] != [x["id"] for x in rb["samples"]]:
        raise SystemExit(f"evidence: {a} and {b} were evaluated on different prompts")
    pairs, identical = [], []
    for x, y in zip(ra["samples"], rb["samples"]):
        if x["responses"][fa] == y["responses"][fb]:
            identical.append(x["id"])
        else:
            pairs.append({"id": x["id"], "prompt": x["prompt"], "chosen": x["responses"][fa],
                          "rejected": y["responses"][fb]})
    (d / "pairs.jsonl").write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    (d / "identical.json").write_text(json.dumps({"a": f"{a.name}/{fa}", "b": f"{b.name}/{fb}", "ids": identical}) + "\n")
    if not pairs:  # every reply identical: nothing to judge
        (d / "judgments.jsonl").write_text("")
        report.write_text(json.dumps({"pairs": 0}) + "\n")
        return report
    sets, env = judge(args, server, args.property, OTHER[args.readout])
    oaif("annotate", str(d / "pairs.jsonl"), "--against-labels", "--no-progress", "--out", str(d / "judgments.jsonl"),
         "--report", str(d / "partial.json"), *[x for s in sets for x in ("--set", s)], log=log, env=env)
    (d / "partial.json").rename(report)
    return report


def final_label(result: dict) -> str:
    """The last checkpoint's label in an `oaif eval --run` result."""
    return max(result["models"], key=lambda m: result["models"][m]["step"])


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
        evaluate(args, train(args, name, [f"annotator.{s}" for s in sets], env, log), log)


def claim_offline(args, server, log: Path) -> None:
    sets, env = judge(args, server, args.property, args.readout)
    online = train(args, "property", [f"annotator.{s}" for s in sets], env, log)
    evaluate(args, online, log)
    prefs = offline_pairs(args, server, log)
    pairs_per_step = args.batch_size * args.num_samples * (args.num_samples - 1) // 2
    offline = train(args, "offline", ["train.mode=offline", f"data.preference_path={prefs}",
                                      f"train.batch_size={pairs_per_step}"], {}, log)
    evaluate(args, offline, log)
    head_to_head(args, server, online, offline, "online_vs_offline", log)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("claim", choices=("rubric", "offline", "table"))
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
            (claim_rubric if args.claim == "rubric" else claim_offline)(args, server, log)
    print(write_summary(args))


if __name__ == "__main__":
    main()
