"""Label response pairs with an annotator, or measure how often it agrees with human labels.

Label a file of pairs and write a preference file (prompt, chosen, rejected, prob):

  oaif annotate pairs.jsonl --out prefs.jsonl [annotator options]

  The input is JSONL (optionally .gz) with `prompt` (text or chat messages) and two responses,
  `chosen`/`rejected` or `a`/`b` (an existing label is ignored: the judge decides), or Anthropic
  HH transcripts (`chosen`/`rejected` only). Each output row is oriented by the judge: `chosen`
  is the response it prefers and `prob` is P(chosen better), averaged over both orders. Ties
  (exactly 0.5) and failed judgments are left out and counted by reason.

Sample two responses per prompt from a model, then label them (how offline baseline data is made):

  oaif annotate prompts.jsonl --sample-from MODEL --out prefs.jsonl
                [--num-samples 2 --max-new-tokens 64 --temperature 0.9 --seed 0]

Measure agreement with human labels (HH transcripts, or JSONL with prompt/chosen/rejected where
`chosen` is the human-preferred response):

  oaif annotate hh_harmless_test.jsonl.gz --against-labels [--limit N] [--report agreement.json]
                [--out judgments.jsonl]

  agreement       fraction of judged pairs whose winner is the human `chosen` (a tie counts 1/2)
  95% CI          Wilson score interval for that fraction
  consistency     fraction of judged pairs whose two orders pick the same winner
  first-position  fraction of single-order readings that pick the response shown first (0.5 = no bias)
  confidence      mean of max(p, 1 - p) over judged pairs
  verdict         whether the labels are better than coin flips (consistency under 0.5 and
                  confidence under 0.6 are noise, as during training; DEVELOPERS.md); noise also
                  prints `oaif: warning: ...` with what to do

Annotator options (defaults: the in-process SmolLM2 judge with the helpful rubric):

  --annotator-config FILE.yaml   a YAML whose `annotator:` group (e.g. a training config) or top
                                 level holds annotator keys
  --set key=value                an annotator key (repeatable), e.g. --set rubric=harmless
                                 --set type=callable --set callable=oaif.annotators.rules:prefer_shorter
  `oaif config keys` lists the annotator.* keys.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from oaif.commands.annotate_inputs import Pair, load_pairs, load_sample_prompts, sample_pairs
from oaif.commands.judge_options import add_annotator_arguments, quiet_judges, refuse_policy_judge
from oaif.redaction import redact, remember
from oaif.stats import mean, outcomes, score, wilson_interval

# Heavy imports (torch, transformers, the judge) happen inside run(): the CLI imports this module
# to build its parser.


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="pairs JSONL, prompts file (with --sample-from), or labelled pairs "
                                      "(with --against-labels)")
    parser.add_argument("--out", help="preference file to write (JSONL, .gz ok); with --against-labels, "
                                      "optional per-pair judgments JSONL")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--sample-from", metavar="MODEL",
                      help="sample responses to the input prompts from MODEL, then label them")
    mode.add_argument("--against-labels", action="store_true",
                      help="compare the annotator with the human labels of the input (chosen = human-preferred)")
    parser.add_argument("--report", metavar="FILE.json", help="write every number of the run as JSON")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N pairs (prompts with --sample-from)")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="pairs per annotator call (and prompts per generation batch); default 32")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")

    add_annotator_arguments(parser, "rubric=harmless, type=callable")

    g = parser.add_argument_group("sampling (with --sample-from)")
    g.add_argument("--num-samples", type=int, default=2, help="responses per prompt, paired (0,1), (2,3), ...; even")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.9)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--prompt-field", default="prompt", help="column holding the prompt (default: prompt)")
    g.add_argument("--max-prompt-tokens", type=int, default=512,
                   help="skip (and count) prompts longer than this after the chat template")


# --------------------------------------------------------------------------------------------
# input
# --------------------------------------------------------------------------------------------
def _reads_by_position(judgment, sent_as_a: bool) -> tuple[float, float] | None:
    """P(the response sent as ``a`` (else ``b``) better), read with it shown first and shown second;
    ``None`` unless both orders were read."""
    j = judgment
    if j.prob_ab is None or j.prob_ba is None:
        return None
    return (j.prob_ab, j.prob_ba) if sent_as_a else (1.0 - j.prob_ba, 1.0 - j.prob_ab)


def judge_stats(judgments: list) -> dict:
    """Numbers about the judge alone: counts, failures, consistency, position bias, confidence."""
    from oaif.annotators.base import failure_counts

    ok = [j for j in judgments if j.ok]
    failed = failure_counts(judgments)
    both = [j for j in ok if j.prob_ab is not None and j.prob_ba is not None]
    # each single-order reading as P(shown-first better): a shown first, then b shown first
    first = [score(_reads_by_position(j, side)[0]) for side in (True, False) for j in both]
    return {
        "pairs": len(judgments),
        "judged": len(ok),
        "failed": failed,
        "failed_total": sum(failed.values()),
        "ties": sum(1 for j in ok if j.prob == 0.5),
        "position_consistency": mean([1.0 if j.consistent else 0.0 for j in both]),
        "consistency_pairs": len(both),
        "first_position_rate": mean(first),
        "mean_confidence": mean([max(j.prob, 1.0 - j.prob) for j in ok]),
    }


def noise_verdict(stats: dict) -> dict:
    """Whether :func:`judge_stats`' labels are no better than coin flips, by the training run's thresholds."""
    from oaif.run.judge_noise import MIN_CONSISTENCY, MIN_DISTANCE, is_noise

    distance = stats["mean_confidence"] - 0.5 if stats["mean_confidence"] is not None else None
    return {"noise": is_noise(stats["position_consistency"], distance), "distance": distance,
            "min_consistency": MIN_CONSISTENCY, "min_distance": MIN_DISTANCE}


def agreement_stats(judgments: list, swapped: list[bool]) -> dict:
    """Agreement with human labels. ``swapped[i]``: the human-chosen response was sent as ``b``."""
    p_chosen, first_reads, second_reads = [], [], []
    for j, sw in zip(judgments, swapped):
        p = j.prob_for(not sw)
        if p is None:
            continue
        p_chosen.append(p)
        reads = _reads_by_position(j, not sw)
        if reads is not None:
            first_reads.append(score(reads[0]))
            second_reads.append(score(reads[1]))
    o = outcomes(p_chosen)
    ci = wilson_interval(sum(o.scores), o.n)
    return {
        "agreement": o.rate,
        "agreement_ci95": list(ci) if ci else None,
        "ci_method": "wilson",
        "agree": o.wins,
        "disagree": o.losses,
        "ties": o.ties,
        "mean_p_chosen": mean(p_chosen),
        "agreement_by_order": {"chosen_shown_first": mean(first_reads), "chosen_shown_second": mean(second_reads)},
    }


def orient(pairs: list[Pair], judgments: list):
    """Preference records oriented by the judge (chosen = preferred, prob = P(chosen better)).

    Returns ``(records, ties)``; failed judgments and exact ties are left out.
    """
    from oaif.data.records import PreferenceRecord

    records, ties = [], 0
    for pair, j in zip(pairs, judgments):
        if not j.ok:
            continue
        if j.prob == 0.5:
            ties += 1
        elif j.prob > 0.5:
            records.append(PreferenceRecord(pair.id, pair.prompt, pair.a, pair.b, prob=float(j.prob)))
        else:
            records.append(PreferenceRecord(pair.id, pair.prompt, pair.b, pair.a, prob=float(1.0 - j.prob)))
    return records, ties


# --------------------------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------------------------
def _check_sampling_args(args) -> None:
    from oaif.errors import ConfigError

    if args.num_samples < 2 or args.num_samples % 2:
        raise ConfigError(f"--num-samples must be even and >= 2, got {args.num_samples}")
    if args.temperature <= 0:
        raise ConfigError(f"--temperature must be > 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.max_prompt_tokens < 1:
        raise ConfigError(f"--max-prompt-tokens must be >= 1, got {args.max_prompt_tokens}")


# --------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------
def _write_judgments(path: str, pairs: list[Pair], judgments: list, swapped: list[bool]) -> None:
    import gzip
    import io

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    f = io.TextIOWrapper(gzip.open(tmp, "wb"), encoding="utf-8") if p.name.endswith(".gz") \
        else open(tmp, "w", encoding="utf-8")
    with f:
        for pair, j, sw in zip(pairs, judgments, swapped):
            row: dict[str, Any] = {"id": pair.id, "prompt": pair.prompt, "chosen": pair.a, "rejected": pair.b,
                                   "judge": j.judge, "failure": j.failure}
            if j.ok:
                p_chosen = j.prob_for(not sw)
                row["p_chosen"] = p_chosen
                reads = _reads_by_position(j, not sw)
                if reads is not None:
                    row["p_chosen_shown_first"], row["p_chosen_shown_second"] = reads
                    row["consistent"] = j.consistent
                row["agree"] = score(p_chosen)
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(p)


def _check_not_the_input(out: Path, flag: str, source: str) -> None:
    """Refuse an output file that is the input itself (by path, symlink or hard link): it would be replaced."""
    import os

    from oaif.errors import ConfigError

    same = out.exists() and Path(source).exists() and os.path.samefile(out, source)
    if same or out == Path(source).resolve():
        raise ConfigError(f"{flag}: {out} is the input file; writing it would replace the input "
                          "(choose another file)")


def run(args: argparse.Namespace) -> int:
    from oaif.config import load_annotator_config
    from oaif.errors import ConfigError

    t0 = time.perf_counter()
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {args.limit}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not args.against_labels and not args.out:
        raise ConfigError("--out is required (the preference file to write), except with --against-labels")
    cfg = load_annotator_config(args.annotator_config, args.sets)
    refuse_policy_judge(cfg)
    remember(asdict(cfg))  # credentials in its URL are redacted from here on
    from oaif.run.run_dir import check_output_file

    written = {}
    for flag, path in (("--out", args.out), ("--report", args.report)):
        if path is not None:  # checked now: the results must not be lost after the work is done
            written[flag] = check_output_file(path, flag)
            _check_not_the_input(written[flag], flag, args.input)
    if len(written) == 2 and written["--out"] == written["--report"]:
        raise ConfigError(f"--out and --report name the same file: {args.out}")
    with quiet_judges(getattr(args, "verbose", False)):
        return _run(args, cfg, t0)


def _nothing_to_judge(args, what: str, skipped: Counter) -> None:
    """A one-line error when the input left nothing to judge (every row empty, identical, too long)."""
    from oaif.errors import DataError
    from oaif.evaluation.formats import fmt_counts

    raise DataError(f"{args.input}: no {what} to judge (skipped: {fmt_counts(dict(sorted(skipped.items())))}); "
                    "nothing written")


def check_judged(judgments: list, written: int | None) -> None:
    """A one-line error when no judgment succeeded, or (labelling) no preference is left to write."""
    from oaif.annotators.base import failure_counts
    from oaif.errors import AnnotatorError
    from oaif.evaluation.formats import fmt_counts

    if judgments and not any(j.ok for j in judgments):
        raise AnnotatorError(f"every judgment failed ({len(judgments)} pairs; {fmt_counts(failure_counts(judgments))}); "
                             "nothing written")
    if written == 0:
        raise AnnotatorError(f"no preference to write: the judge called all {len(judgments)} judged pairs ties; "
                             "nothing written")


def _run(args: argparse.Namespace, cfg, t0: float) -> int:
    from oaif.annotators.base import PairRequest, annotate_all
    from oaif.annotators.build import build_annotator
    from oaif.data.records import messages_to_text

    skipped: Counter = Counter()
    if args.sample_from:
        _check_sampling_args(args)
        records, rows = load_sample_prompts(args, skipped)
        if not records:
            _nothing_to_judge(args, "prompt", skipped)
        from oaif.models.load import load_causal_lm

        model, tok = load_causal_lm(args.sample_from)
        # built before sampling, so a bad annotator fails fast; a judge named like the sampled
        # model reuses it instead of loading a second copy
        annotator = build_annotator(cfg, policy_path=args.sample_from, reference=model, tokenizer=tok)
        pairs = sample_pairs(args, records, model, tok, skipped)
    else:
        pairs, rows, skipped = load_pairs(args.input, labelled=args.against_labels)
        if args.limit is not None:
            pairs = pairs[: args.limit]
        if pairs:
            annotator = build_annotator(cfg)
    if not pairs:
        _nothing_to_judge(args, "pair", skipped)

    # With labels, alternate which slot holds the human-chosen response, so a judge asked in one
    # order only (both_orders=false) is not flattered or punished by its position bias.
    swapped = [args.against_labels and i % 2 == 1 for i in range(len(pairs))]
    requests = [PairRequest(prompt=messages_to_text(p.prompt), a=p.b if sw else p.a, b=p.a if sw else p.b,
                            prompt_id=p.id) for p, sw in zip(pairs, swapped)]

    def live(judgments):
        ok = [j for j in judgments if j.ok]
        post = {"failed": len(judgments) - len(ok)}
        if args.against_labels and ok:
            post["agree"] = f"{agreement_stats(judgments, swapped)['agreement']:.3f}"
        return post

    t_judge = time.perf_counter()
    judgments = annotate_all(annotator, requests, args.batch_size, progress=not args.no_progress, on_batch=live)
    judge_s = time.perf_counter() - t_judge

    stats = judge_stats(judgments)
    report: dict[str, Any] = {
        "judge": getattr(annotator, "name", type(annotator).__name__),
        "input": str(args.input),
        "mode": "against_labels" if args.against_labels else "sample" if args.sample_from else "pairs",
        "limit": args.limit,
        "rows": rows,
        "skipped": dict(sorted(skipped.items())),
    }
    if args.against_labels:
        check_judged(judgments, None)
        report.update(agreement_stats(judgments, swapped))
        report.update({k: v for k, v in stats.items() if k != "ties"})
    else:
        records, ties = orient(pairs, judgments)
        check_judged(judgments, len(records))
        report.update(stats)
        if args.sample_from:
            report["sampled_from"] = args.sample_from
            report["sampling"] = {"num_samples": args.num_samples, "max_new_tokens": args.max_new_tokens,
                                  "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed}
        from oaif.data.preferences import save_preferences

        report["written"] = save_preferences(args.out, records)
        report["ties"] = ties
        report["out"] = str(args.out)
    report["judge_noise"] = noise_verdict(stats)
    report["annotator"] = redact(asdict(cfg))
    report["judge_seconds"] = round(judge_s, 3)
    report["seconds"] = round(time.perf_counter() - t0, 3)
    report["pairs_per_second"] = round(len(pairs) / judge_s, 3) if judge_s > 0 else None

    if args.against_labels and args.out:
        _write_judgments(args.out, pairs, judgments, swapped)
    if args.report:
        from oaif.evaluation.formats import write_json

        write_json(args.report, report)
    _print_summary(report, args)
    return 0


def _print_summary(r: dict, args) -> None:
    from oaif.evaluation.formats import fmt, fmt_counts

    lines = [f"judge            {r['judge']}",
             f"input            {r['input']} ({r['rows']} rows; skipped: {fmt_counts(r['skipped'])})",
             f"pairs            {r['pairs']} (judged {r['judged']}, failed {r['failed_total']}: {fmt_counts(r['failed'])})"]
    if args.against_labels:
        ci = r["agreement_ci95"]
        lines += [f"agreement        {fmt(r['agreement'])}  95% CI [{fmt(ci[0]) if ci else 'n/a'}, "
                  f"{fmt(ci[1]) if ci else 'n/a'}] (Wilson; agree {r['agree']}, disagree {r['disagree']}, "
                  f"ties {r['ties']} counted 1/2)",
                  f"by order         chosen shown first {fmt(r['agreement_by_order']['chosen_shown_first'])}, "
                  f"shown second {fmt(r['agreement_by_order']['chosen_shown_second'])}"]
    else:
        lines.append(f"written          {r['written']} preferences to {r['out']} (ties skipped: {r['ties']})")
    lines += [f"consistency      {fmt(r['position_consistency'])} (pairs whose two orders agree)",
              f"first-position   {fmt(r['first_position_rate'])} (readings picking the response shown first)",
              f"confidence       {fmt(r['mean_confidence'])} (mean max(p, 1-p))",
              f"verdict          {_verdict(r)}",
              f"time             {r['seconds']:.1f} s ({fmt(r['pairs_per_second'], 2)} pairs/s judging)"]
    if args.against_labels and args.out:
        lines.append(f"judgments        {args.out}")
    if args.report:
        lines.append(f"report           {args.report}")
    print("\n".join(lines))
    if r["judge_noise"]["noise"]:
        import sys

        from oaif.run.judge_noise import ADVICE

        sys.stderr.write(f"oaif: warning: the judge's labels look no better than coin flips: {_verdict(r)}; {ADVICE}\n")


def _verdict(r: dict) -> str:
    """The judge noise check in words: the numbers, the thresholds, the outcome."""
    from oaif.evaluation.formats import fmt

    v = r["judge_noise"]
    if r["position_consistency"] is None:
        return "not checked (no pair was read in both orders)"
    return (f"both-order consistency {fmt(r['position_consistency'])} (noise under {v['min_consistency']}), mean "
            f"|P - 0.5| {fmt(v['distance'])} (noise under {v['min_distance']}): "
            + ("no better than coin flips" if v["noise"] else "better than coin flips"))
