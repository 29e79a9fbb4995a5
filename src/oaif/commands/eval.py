"""Head-to-head win rate of two models, or of a run's checkpoints against its starting model.

Two models on a prompt file (win rate of MODEL_A against MODEL_B):

  oaif eval MODEL_A MODEL_B --prompts prompts.jsonl [--limit N] [--out DIR] [annotator options]

Every checkpoint of a training run against the run's starting model (a win-rate curve):

  oaif eval --run runs/demo [--steps 10,20] [--limit N] [--out DIR] [annotator options]

  The starting model is the run's model.name_or_path (runs/demo/config.yaml). The prompts are the
  run's held-out prompts (data.eval_path, or the data.eval_fraction split chosen exactly as the
  trainer chose it), unless --prompts FILE is given. Response length, chat template, system prompt
  and dtype default to the run's settings (the dtype is model.dtype, the weights' own: the
  autocast of train.mixed_precision=bf16 is not applied, so both models are compared in float32
  unless --dtype bfloat16 is given).

Each model answers each prompt once: sampling at --temperature 0.7 (top-p 1.0) with --seed 0,
the same seed for every model (response i uses the row seed (seed, i, 0)), in batches of
--batch-size prompts. The judge compares each pair (A's response shown first on even prompts,
second on odd ones; judges that read both orders average them). Per prompt the judge's P(A better)
p scores 1 if p > 0.5, 1/2 if p = 0.5, 0 otherwise; identical responses are ties without a judge
call; failed judgments are left out and counted by reason.

  win rate         mean score over judged prompts (ties count 1/2)
  95% CI           percentile bootstrap over prompts (--bootstrap 1000 resamples, --bootstrap-seed 0)
  mean P(better)   mean of p, with its own bootstrap CI
  lengths          per model: tokens and characters, mean / median / p10 / p90 and a histogram

Output in --out (default: RUN/eval with --run, else ./eval): eval.json (every number, the settings,
the judge, and every prompt with its responses and judgments), report.md and PNG plots (win rate
over steps with its CI band, length over steps, the run's training curves; or the A vs B win rate
and length histograms).

Annotator options (default: the in-process SmolLM2 judge with the helpful rubric; the judge need
not be the one the run trained with, and the report names both):

  --annotator-config FILE.yaml   a YAML whose `annotator:` group (e.g. a run's config.yaml) or top
                                 level holds annotator keys
  --set key=value                an annotator key (repeatable), e.g. --set rubric=helpful_short
                                 --set type=callable --set callable=oaif.annotators.rules:prefer_shorter
  `oaif config keys` lists the annotator.* keys.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from oaif.commands.judge_options import add_annotator_arguments, quiet_judges, refuse_policy_judge

# Heavy imports (torch, transformers, matplotlib, the judge) happen inside run(): the CLI imports
# this module to build its parser.


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="*", metavar="MODEL",
                        help="MODEL_A MODEL_B: two models (hub id, directory, .gguf, embedded name); not with --run")
    parser.add_argument("--run", metavar="RUN_DIR", help="a training run directory: evaluate its checkpoint-N "
                                                         "directories against its starting model")
    parser.add_argument("--steps", metavar="N,M,...", help="with --run: only these checkpoint steps (default: all)")
    parser.add_argument("--prompts", metavar="FILE", help="prompt file (JSONL, CSV, Parquet, datasets directory); "
                                                         "required for two models, optional with --run")
    parser.add_argument("--prompt-field", default="prompt", help="column holding the prompt (default: prompt)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    parser.add_argument("--out", metavar="DIR", help="output directory (default: RUN_DIR/eval with --run, else ./eval)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--samples-in-report", type=int, default=3, metavar="N",
                        help="prompts shown with their responses in report.md (all are in eval.json); default 3")

    g = parser.add_argument_group("generation")
    g.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--max-new-tokens", type=int, default=None,
                   help="longest response (default: the run's sampling.max_new_tokens, else 64)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed, the same for every model (default 0)")
    g.add_argument("--batch-size", type=int, default=16, help="prompts per generation batch and pairs per judge call")
    g.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="skip (and count) longer prompts (default: the run's data.max_prompt_tokens, else 512)")
    g.add_argument("--no-chat-template", action="store_true", help="feed prompts as plain text")
    g.add_argument("--system-prompt", default=None, help="system message for every prompt (default: the run's)")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16", "auto"],
                   help="model weights dtype (default: the run's model.dtype, else float32)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])

    g = parser.add_argument_group("statistics")
    g.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% CIs (default 1000)")
    g.add_argument("--bootstrap-seed", type=int, default=0)

    add_annotator_arguments(parser, "rubric=helpful_short, type=callable")


def _parse_steps(text: str | None) -> list[int] | None:
    from oaif.errors import ConfigError

    if not text:
        return None
    try:
        steps = [int(s) for s in text.replace(" ", "").split(",") if s]
    except ValueError:
        raise ConfigError(f"--steps must be comma-separated step numbers, got {text!r}") from None
    if not steps:
        raise ConfigError(f"--steps names no step: {text!r}")
    return steps


def settings_from(args: argparse.Namespace):
    from oaif.errors import ConfigError
    from oaif.evaluation.responses import EvalSettings

    try:
        (args.system_prompt or "").encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError("--system-prompt: not text (bytes that are not UTF-8)") from None

    s = EvalSettings(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                     seed=args.seed, batch_size=args.batch_size, chat_template=False if args.no_chat_template else None,
                     system_prompt=args.system_prompt, max_prompt_tokens=args.max_prompt_tokens, dtype=args.dtype,
                     device=args.device, bootstrap=args.bootstrap, bootstrap_seed=args.bootstrap_seed)
    s.check()
    return s


def run(args: argparse.Namespace) -> int:
    from oaif.config import load_annotator_config
    from oaif.errors import ConfigError

    if args.run and args.models:
        raise ConfigError("give either two models or --run RUN_DIR, not both")
    if not args.run and len(args.models) != 2:
        raise ConfigError(f"expected two models (MODEL_A MODEL_B) or --run RUN_DIR, got {len(args.models)} model(s)")
    if not args.run and not args.prompts:
        raise ConfigError("--prompts FILE is required when comparing two models")
    if args.steps and not args.run:
        raise ConfigError("--steps needs --run")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {args.limit}")
    if args.samples_in_report < 0:
        raise ConfigError(f"--samples-in-report must be >= 0, got {args.samples_in_report}")
    steps = _parse_steps(args.steps)
    settings = settings_from(args)
    cfg = load_annotator_config(args.annotator_config, args.sets)
    refuse_policy_judge(cfg)
    from dataclasses import asdict

    from oaif.redaction import remember

    remember(asdict(cfg))  # credentials in its URL are redacted from here on
    if args.run and not Path(args.run).is_dir():
        from oaif.errors import DataError

        raise DataError(f"run directory not found: {args.run}")
    from oaif.run.run_dir import check_output_dir

    # checked now: the results must not be lost after the work is done
    check_output_dir(args.out or (Path(args.run) / "eval" if args.run else "eval"), "--out")
    with quiet_judges(getattr(args, "verbose", False)):
        result = _run(args, cfg, settings, steps)
    _print_summary(result, args)
    check_judged(result["comparisons"])
    return 0


def check_judged(comparisons: list[dict]) -> None:
    """A one-line error when a comparison has no win rate: every judgment of its pairs failed."""
    from oaif.errors import AnnotatorError
    from oaif.evaluation.formats import fmt_counts

    empty = [c for c in comparisons if c["wins"] + c["ties"] + c["losses"] == 0]
    if empty:
        names = ", ".join(f"step {c['step']}" if c.get("step") is not None else f"{c['a']} vs {c['b']}" for c in empty)
        failed = sum((Counter(c["failed"]) for c in empty), Counter())
        raise AnnotatorError(f"every judgment failed for {names} ({fmt_counts(dict(sorted(failed.items())))}): "
                             "no win rate")


def _run(args, cfg, settings, steps) -> dict:
    from oaif.evaluation import evaluate
    from oaif.data.prompts import load_prompts

    prompts = source = None
    if args.prompts:
        loaded = load_prompts(args.prompts, field=args.prompt_field)
        prompts = loaded.records
        source = {"kind": "prompt file", "path": str(args.prompts), "rows": loaded.rows, "skipped": dict(loaded.skipped)}
    progress = not args.no_progress
    if args.run:
        out = args.out or str(Path(args.run) / "eval")
        return evaluate.evaluate_run(args.run, cfg, settings=settings, prompts=prompts, prompt_source=source,
                                     limit=args.limit, steps=steps, out_dir=out, progress=progress,
                                     n_samples=args.samples_in_report)
    out = args.out or "eval"
    return evaluate.evaluate_models(args.models[0], args.models[1], prompts, cfg, settings=settings, limit=args.limit,
                                    prompt_source=source, out_dir=out, progress=progress,
                                    n_samples=args.samples_in_report)


def _print_summary(result: dict, args) -> None:
    from oaif.evaluation.formats import fmt, fmt_ci

    p = result["prompts"]
    lines = [f"judge      {result['judge']['name']} ({result['judge']['description']})"]
    if "training_judge" in result["judge"]:
        lines.append(f"training   judge {result['judge']['training_judge']}")
    lines.append(f"prompts    {p['count']} ({p.get('kind', '')}{' ' + p['path'] if p.get('path') else ''}; "
                 f"skipped: {', '.join(f'{k} {v}' for k, v in p['skipped'].items()) or 'none'})")
    for c in result["comparisons"]:
        head = f"step {c['step']:<5}" if c.get("step") is not None else f"{c['a']} vs {c['b']}"
        failed = f", failed {c['failed_total']}" if c["failed_total"] else ""
        lines.append(f"{head}  win rate {fmt(c['win_rate'])} 95% CI {fmt_ci(c['ci95'])}  mean P {fmt(c['mean_prob'])}"
                     f"  (W/T/L {c['wins']}/{c['ties']}/{c['losses']}{failed}; "
                     f"mean tokens {fmt(result['models'][c['a']]['tokens']['mean'], 1)} vs "
                     f"{fmt(result['models'][c['b']]['tokens']['mean'], 1)})")
    out = Path(args.out or (Path(args.run) / "eval" if args.run else "eval"))
    files = result.get("files", {})
    lines.append(f"written    {out / 'eval.json'}, {out / 'report.md'}"
                 + (", " + ", ".join(str(out / f) for f in files.get("plots", {}).values()) if files.get("plots") else ""))
    lines.append(f"time       {result['seconds']:.1f} s")
    print("\n".join(lines))
