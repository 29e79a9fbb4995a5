"""The pieces every claim of experiments/evidence.py is made of: a training run at the sized budget,
its evaluation over checkpoints, and a head-to-head of stored replies by a judge. Each piece is
skipped when its files are on disk, so a rerun continues where a session stopped.
"""

from __future__ import annotations

import json
from pathlib import Path

import properties
from common import ROOT, oaif
from served_judges import POINTWISE, RUBRICS, served_sets

OTHER = {"pointwise": "pairwise", "pairwise": "pointwise"}
GENERAL = ("helpful", "harmless")  # rubrics that ask for no property: oaif's own, or judge_rubrics/pointwise_<name>.yaml


def rubric_file(args, rubric: str, readout: str) -> Path | str:
    """The rubric for ``rubric`` (a property, or one of GENERAL) in ``readout``'s form."""
    import judge_signal

    if rubric in GENERAL:
        return RUBRICS / f"pointwise_{rubric}.yaml" if readout == "pointwise" else rubric
    return judge_signal.rubric_path(rubric, readout, args.out, properties.SHORT_WORDS)


def judge(args, server, rubric: str, readout: str) -> tuple[list[str], dict[str, str]]:
    """Annotator keys (``--set`` / ``annotator.`` form) and environment of the served judge."""
    path = rubric_file(args, rubric, readout)
    if readout == "pointwise":
        return list(POINTWISE), {"OAIF_POINTWISE_URL": server.base_url, "OAIF_POINTWISE_MODEL": args.judge,
                                 "OAIF_POINTWISE_RUBRIC": str(path)}
    return served_sets(server.base_url, args.judge) + [f"rubric={path}"], {}


def settings(args, run_dir: Path, train_prompts: Path) -> list[str]:
    """`oaif train` arguments of a run at the sizing's budget (configs/demo.yaml plus overrides)."""
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


def evaluated(run_dir: Path) -> bool:
    return (run_dir / "eval" / "eval.json").exists()


def train(args, run_dir: Path, train_prompts: Path, overrides: list[str], env: dict[str, str], log: Path) -> Path:
    """Train the run in ``run_dir`` (resuming it if it has a checkpoint); nothing when it is finished."""
    if finished(run_dir, args.steps):
        print(f"# {run_dir.name}: finished", flush=True)
        return run_dir
    again = ["train.resume=true"] if (run_dir / "latest").exists() else ["train.overwrite_output_dir=true"]
    oaif("train", *settings(args, run_dir, train_prompts), *overrides, *again, log=log, env=env)
    return run_dir


def evaluate(args, run_dir: Path, prompts: Path, judge_sets: list[str], log: Path) -> Path:
    """`oaif eval --run` on ``--eval-prompts`` of ``prompts``: every checkpoint and the start, one reply
    per prompt (the same seed), each against the start by the judge of ``judge_sets``."""
    result = run_dir / "eval" / "eval.json"
    if not result.exists():
        oaif("eval", "--run", str(run_dir), "--prompts", str(prompts), "--limit", str(args.eval_prompts),
             "--out", str(run_dir / "eval"), "--max-new-tokens", str(args.max_new_tokens), "--no-progress",
             *[x for s in judge_sets for x in ("--set", s)], log=log)
    return result


def final_label(result: dict) -> str:
    """The last checkpoint's label in an `oaif eval --run` result."""
    return max(result["models"], key=lambda m: result["models"][m]["step"])


def start_label(result: dict) -> str:
    """The starting model's label (step 0) in an `oaif eval --run` result."""
    return min(result["models"], key=lambda m: result["models"][m]["step"])


def head_to_head(d: Path, a: tuple[Path, str], b: tuple[Path, str], judge_sets: list[str], log: Path,
                 env: dict[str, str] | None = None) -> Path:
    """Run ``a``'s reply against run ``b``'s on each held-out prompt, by the judge of ``judge_sets``.

    ``a`` and ``b`` are (run directory, "final" or "start"). The replies are the ones the runs'
    `oaif eval --run` sampled (same prompts, seed and settings, as `oaif eval A B` would sample
    them), so no checkpoint is needed: ``a``'s reply is written as ``chosen`` and `oaif annotate
    --against-labels` gives per prompt whether the judge prefers it (1, a tie 1/2, 0). Identical
    replies are ties without a judge call (``d/identical.json``). Nothing runs when ``d/report.json``
    exists."""
    report = d / "report.json"
    if report.exists():
        return report
    d.mkdir(parents=True, exist_ok=True)
    (ra, la), (rb, lb) = ((_eval(run), which) for run, which in (a, b))
    fa = final_label(ra) if la == "final" else start_label(ra)
    fb = final_label(rb) if lb == "final" else start_label(rb)
    if [x["id"] for x in ra["samples"]] != [x["id"] for x in rb["samples"]]:
        raise SystemExit(f"evidence: {a[0]} and {b[0]} were evaluated on different prompts")
    pairs, identical = [], []
    for x, y in zip(ra["samples"], rb["samples"]):
        if x["responses"][fa] == y["responses"][fb]:
            identical.append(x["id"])
        else:
            pairs.append({"id": x["id"], "prompt": x["prompt"], "chosen": x["responses"][fa],
                          "rejected": y["responses"][fb]})
    (d / "pairs.jsonl").write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    (d / "identical.json").write_text(json.dumps({"a": f"{a[0].name}/{fa}", "b": f"{b[0].name}/{fb}",
                                                  "ids": identical}) + "\n")
    if not pairs:  # every reply identical: nothing to judge
        (d / "judgments.jsonl").write_text("")
        report.write_text(json.dumps({"pairs": 0}) + "\n")
        return report
    oaif("annotate", str(d / "pairs.jsonl"), "--against-labels", "--no-progress", "--out", str(d / "judgments.jsonl"),
         "--report", str(d / "partial.json"), *[x for s in judge_sets for x in ("--set", s)], log=log, env=env)
    (d / "partial.json").rename(report)
    return report


def _eval(run_dir: Path) -> dict:
    return json.loads((run_dir / "eval" / "eval.json").read_text())
