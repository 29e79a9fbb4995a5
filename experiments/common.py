"""Shared plumbing for the experiment scripts: run oaif commands, split prompts, collect numbers.

Each experiment drives the same `oaif` commands a user would type (printed before they run), so
every number it reports can be reproduced step by step by hand. Its summary.json names the files
each number comes from: the `eval.json` of every comparison (`eval_json`) and, for every training
run, its directory, final checkpoint and `metrics.jsonl` (`run_info`). Served judges
(`--judge-gguf`, `--eval-gguf`) are in served_judges.py; curves over steps (`--save-every`) in
curves.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = ROOT / "experiments"
PROMPTS = ROOT / "data" / "prompts" / "demo_prompts.jsonl"


def base_parser(doc: str, out: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=out, help=f"output directory (default {out})")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="starting policy")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run")
    ap.add_argument("--batch-size", type=int, default=4, help="prompts (pairs) per step")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--lr", type=float, default=2e-6, help="peak learning rate (the demo's default: 2e-6)")
    ap.add_argument("--eval-prompts", type=int, default=40, help="held-out prompts for the win rates")
    ap.add_argument("--smoke", action="store_true", help="one step, tiny budgets: checks that everything runs")
    ap.add_argument("--judge-set", action="append", default=[], metavar="KEY=VALUE",
                    help="annotator override for the training judge (repeatable)")
    ap.add_argument("--eval-set", action="append", default=[], metavar="KEY=VALUE",
                    help="annotator override for the evaluation judge (repeatable)")
    ap.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE",
                    help="any other training override, applied last, e.g. --train-set model.lora.enabled=true "
                         "--train-set sampling.num_samples=4 (repeatable)")
    ap.add_argument("--save-every", type=int, default=0,
                    help="checkpoint every N steps and report held-out win rate and length over steps "
                         "(`oaif eval --run`); 0: final checkpoint only")
    ap.add_argument("--judge-gguf", metavar="NAME_OR_PATH",
                    help="serve this GGUF (a scripts/fetch_judge.py name or a file) with llama.cpp on loopback "
                         "as the training judge")
    ap.add_argument("--eval-gguf", metavar="NAME_OR_PATH", help="the same for the evaluation judge")
    ap.add_argument("--judge-readout", choices=("pairwise", "pointwise"), default="pairwise",
                    help="served training judge: pairwise labels (oaif's openai judge) or a yes/no score per "
                         "reply (experiments/pointwise_judge.py)")
    ap.add_argument("--eval-readout", choices=("pairwise", "pointwise"), default="pairwise",
                    help="the same for the served evaluation judge")
    ap.add_argument("--server-threads", type=int, default=2, help="threads of each llama.cpp server")
    return ap


def parse_args(ap: argparse.ArgumentParser, default_steps: int) -> tuple[argparse.Namespace, Path, Path]:
    """Parse the command line and fill in the smoke-mode budgets; returns ``(args, out, log)``:
    the output directory (resolved against the repository root, created) and its commands.log."""
    args = ap.parse_args()
    if not Path(args.out).is_absolute():
        args.out = str(ROOT / args.out)
    if args.smoke:
        args.steps, args.batch_size, args.max_new_tokens, args.eval_prompts = 1, 2, 8, 2
    elif args.steps is None:
        args.steps = default_steps
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return args, out, out / "commands.log"


def oaif(*argv: str, log: Path | None = None, env: dict[str, str] | None = None) -> float:
    """Run an oaif command (``env``: extra environment), echoing it; returns its wall time.
    A failure stops the experiment."""
    cmd = [sys.executable, "-m", "oaif.cli", *argv]
    print("$ " + "".join(f"{k}={shlex.quote(v)} " for k, v in (env or {}).items())
          + "oaif " + " ".join(shlex.quote(a) for a in argv), flush=True)
    t0 = time.perf_counter()
    with open(log, "a") if log else open("/dev/null", "w") as f:
        result = subprocess.run(cmd, cwd=ROOT, stdout=f if log else None, stderr=subprocess.STDOUT if log else None,
                                env={**os.environ, **env} if env else None)
    if result.returncode != 0:
        raise SystemExit(f"command failed ({result.returncode}): oaif {' '.join(argv)}" + (f"; see {log}" if log else ""))
    return time.perf_counter() - t0


def split_prompts(out: Path, n_eval: int, seed: int = 1234) -> tuple[Path, Path]:
    """Write a fixed train / held-out split of the shipped demo prompts into ``out``."""
    from oaif.data.prompts import load_prompts
    from oaif.data.split import split_eval

    records = load_prompts(PROMPTS).records
    train, held = split_eval(records, max(n_eval, 1) / len(records), seed)
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "train_prompts.jsonl", out / "heldout_prompts.jsonl"
    for path, rows in zip(paths, (train, held[:n_eval])):
        path.write_text("".join(json.dumps({"id": r.id, "prompt": r.prompt}) + "\n" for r in rows))
    return paths


def train_overrides(args, out_dir: Path, train_prompts: Path, *extra: str) -> list[str]:
    return [str(ROOT / "configs" / "demo.yaml"), f"model.name_or_path={args.model}", f"data.path={train_prompts}",
            "data.eval_fraction=0", f"train.max_steps={args.steps}", f"train.batch_size={args.batch_size}",
            f"sampling.max_new_tokens={args.max_new_tokens}", f"train.output_dir={out_dir}",
            f"train.save_every={args.save_every}", "train.keep_last=1000",
            "train.overwrite_output_dir=true",  # a rerun of the experiment starts its runs afresh
            f"optim.lr={args.lr}",
            *[f"annotator.{s}" for s in args.judge_set], *extra, *args.train_set]


def final_checkpoint(run_dir: Path) -> Path:
    return run_dir / (run_dir / "latest").read_text().strip()


def run_info(run_dir: Path) -> dict:
    """Where a finished training run keeps what the summary reports about it."""
    return {"dir": str(run_dir), "checkpoint": str(final_checkpoint(run_dir)), "metrics": str(run_dir / "metrics.jsonl")}


def eval_pair(args, a: str, b: str, heldout: Path, out_dir: Path, log: Path) -> dict:
    """`oaif eval A B` on the held-out prompts; returns the headline of its eval.json."""
    oaif("eval", str(a), str(b), "--prompts", str(heldout), "--limit", str(args.eval_prompts), "--out", str(out_dir),
         "--max-new-tokens", str(args.max_new_tokens), "--no-progress",
         *[x for s in args.eval_set for x in ("--set", s)], log=log)
    return headline(out_dir / "eval.json")


def headline(eval_json: Path, a: str | None = None) -> dict:
    """Win rate with its CI, and both models' mean response length, from an eval.json (named in it):
    its first comparison, or the one whose model A is labelled ``a`` (a checkpoint's directory name
    in an `oaif eval --run` result)."""
    result = json.loads(eval_json.read_text())
    c = result["comparisons"][0] if a is None else next(c for c in result["comparisons"] if c["a"] == a)
    models = result["models"]
    return {"win_rate": c["win_rate"], "ci": c["ci95"], "n": c["judged"], "failed": c["failed_total"],
            "ties": c["ties"], "consistency": c.get("judge_consistency"),
            "len_a": models[c["a"]]["tokens"]["mean"], "len_b": models[c["b"]]["tokens"]["mean"],
            "judge": result["judge"]["name"], "eval_json": str(eval_json)}


def final_vs_start(args, run_dir: Path, heldout: Path, out_dir: Path, log: Path, curve: dict | None) -> dict:
    """The run's final checkpoint against the start. With a curve (`eval_run` with the same judge)
    that kept every held-out prompt, its last point is that comparison (same prompts, seed and
    judge), so it is read from there instead of being generated and judged a second time. A curve
    that skipped prompts (`oaif eval --run` applies the run's data.max_prompt_tokens) is not reused."""
    final = final_checkpoint(run_dir)
    if curve is not None:
        prompts = json.loads(Path(curve["eval_json"]).read_text())["prompts"]
        if not prompts.get("skipped") and prompts["count"] == min(prompts["rows"], args.eval_prompts):
            return headline(Path(curve["eval_json"]), final.name)
    return eval_pair(args, final, args.model, heldout, out_dir, log)


def fmt(h: dict) -> str:
    ci = h.get("ci") or [float("nan"), float("nan")]
    return f"{h['win_rate']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] (n={h['n']})"


def write_summary(out: Path, name: str, rows: list[dict], lines: list[str]) -> None:
    (out / "summary.json").write_text(json.dumps({"experiment": name, "rows": rows}, indent=2))
    (out / "summary.md").write_text(f"# {name}\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))
