"""Judging an evaluation's pairs and the win rate.

:func:`win_rate` -- per prompt, the judge's P(A better) ``p`` scores 1 if ``p > 0.5``, 1/2 if
``p == 0.5`` and 0 otherwise; the win rate is the mean score over judged prompts, with the mean
probability next to it, each with a percentile bootstrap interval over prompts (seeded, 1000
resamples by default). Failed judgments are left out and counted by reason. The statistics
themselves (scores, bootstrap, length distributions) are :mod:`oaif.stats`.

A pair whose two responses are identical is a tie by definition: it scores 1/2 without asking the
judge (``judge = "identical"``). To keep a judge that reads one order only from favouring either
model by its position bias, model A's response is sent as ``a`` for even prompt indices and as
``b`` for odd ones (``a_is_first``); judges that read both orders average them anyway.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Sequence

from oaif.evaluation.responses import EvalSettings, Generation
from oaif.stats import bootstrap_ci, mean, outcomes, score


def win_rate(judgments: Sequence, a_is_first: Sequence[bool] | None = None, *, n_bootstrap: int = 1000,
             seed: int = 0) -> dict:
    """Win rate of model A from judgments of pairs (one pair per prompt).

    ``judgments[i]`` is a :class:`~oaif.annotators.base.Judgment` of a request whose ``a`` is model
    A's response when ``a_is_first[i]`` (default: always), else model B's. Returns

    ``win_rate``      mean score (win 1, tie 1/2, loss 0) over judged prompts (None if none)
    ``ci95``          percentile bootstrap interval over prompts for it (``n_bootstrap``, ``seed``)
    ``mean_prob``     mean P(A better) over judged prompts, with ``mean_prob_ci95``
    ``wins``, ``ties``, ``losses``, ``judged``, ``pairs``
    ``failed``        failures by reason (never scored), ``failed_total``
    """
    from oaif.annotators.base import failure_counts

    if a_is_first is None:
        a_is_first = [True] * len(judgments)
    if len(a_is_first) != len(judgments):
        raise ValueError(f"{len(judgments)} judgments but {len(a_is_first)} a_is_first flags")
    probs = [p for j, first in zip(judgments, a_is_first) if (p := j.prob_for(first)) is not None]
    o = outcomes(probs)
    failed = failure_counts(judgments)
    ci = bootstrap_ci(o.scores, n_bootstrap, seed) if probs else None
    ci_p = bootstrap_ci(probs, n_bootstrap, seed) if probs else None
    return {
        "win_rate": o.rate,
        "ci95": list(ci) if ci else None,
        "mean_prob": mean(probs),
        "mean_prob_ci95": list(ci_p) if ci_p else None,
        "wins": o.wins,
        "ties": o.ties,
        "losses": o.losses,
        "judged": o.n,
        "pairs": len(judgments),
        "failed": failed,
        "failed_total": sum(failed.values()),
        "ci_method": f"percentile bootstrap over prompts, {n_bootstrap} resamples, seed {seed}",
    }


def describe_judge(cfg) -> str:
    """A short human description of an annotator config (what judges, with which rubric)."""
    if cfg is None:
        return "a custom annotator object"
    t = cfg.type
    if t == "callable":
        desc = f"callable {cfg.callable}"
    elif t == "llm":
        desc = f"llm {cfg.model}, rubric {cfg.rubric}"
    elif t == "openai":
        desc = f"openai {cfg.model} at {cfg.base_url}, rubric {cfg.rubric}"
    elif t == "reward_model":
        desc = f"reward model {cfg.model}"
    elif t == "ensemble":
        members = ", ".join(str(m.get("callable") or m.get("model") or m.get("type")) if isinstance(m, dict) else str(m)
                            for m in cfg.members)
        desc = f"ensemble ({cfg.ensemble_mode}) of {members}"
    else:
        desc = t
    if t != "reward_model":
        desc += ", both orders" if cfg.both_orders else ", one order"
    return desc


def default_judge_cfg(annotator_cfg, annotator):
    """The default judge config (``oaif config keys``: the in-process SmolLM2, helpful rubric) when
    neither a config nor an annotator object is given."""
    if annotator is None and annotator_cfg is None:
        from oaif.config import AnnotatorConfig

        return AnnotatorConfig()
    return annotator_cfg


def build_judge(annotator_cfg, annotator, settings: EvalSettings, device):
    """The given annotator object, else the judge ``annotator_cfg`` configures (built on ``device``)."""
    if annotator is not None:
        return annotator
    from oaif.annotators.build import build_annotator

    return build_annotator(annotator_cfg, cache_dir=settings.cache_dir, device=device)


def judge_info(annotator, annotator_cfg) -> dict:
    """The judge as ``eval.json`` names it: its name, a description and its config (None for an object),
    with no credentials from a URL (:func:`oaif.redaction.redact`)."""
    from oaif.redaction import redact

    return redact({"name": getattr(annotator, "name", type(annotator).__name__),
                   "description": describe_judge(annotator_cfg),
                   "config": dataclasses.asdict(annotator_cfg) if annotator_cfg is not None else None})


def judge(annotator, records: Sequence, gen_a: Generation, gen_b: Generation, settings: EvalSettings, *,
          progress: bool = True) -> tuple[list, list[bool], float]:
    """Judge A's response against B's for every prompt. Returns ``(judgments, a_is_first, seconds)``.

    Identical responses are ties without a judge call; A goes in slot ``a`` for even prompt
    indices and in slot ``b`` for odd ones.
    """
    from oaif.annotators.base import Judgment, PairRequest, annotate_all

    t0 = time.perf_counter()
    a_is_first = [i % 2 == 0 for i in range(len(records))]
    judgments: list = [None] * len(records)
    todo = []
    for i, rec in enumerate(records):
        ya, yb = gen_a.texts[i], gen_b.texts[i]
        if ya == yb:
            judgments[i] = Judgment(prob=0.5, judge="identical", extra={"identical": True})
            continue
        first, second = (ya, yb) if a_is_first[i] else (yb, ya)
        todo.append((i, PairRequest(prompt=rec.text, a=first, b=second, prompt_id=rec.id)))
    out = annotate_all(annotator, [req for _, req in todo], settings.batch_size, progress=progress,
                       desc=f"judge {gen_a.label} vs {gen_b.label}")
    for (i, _), j in zip(todo, out):
        judgments[i] = j
    return judgments, a_is_first, time.perf_counter() - t0


def _judgment_row(j, first: bool, a: str, b: str) -> dict:
    p = j.prob_for(first)
    row = {"a": a, "b": b, "a_is_first": first, "prob_a": p, "score": None if p is None else score(p),
           "failure": j.failure, "prob": j.prob, "prob_ab": j.prob_ab, "prob_ba": j.prob_ba, "judge": j.judge,
           "identical": bool(j.extra.get("identical", False))}
    extra = {k: v for k, v in j.extra.items() if k != "identical"}
    if extra:
        row["extra"] = json.loads(json.dumps(extra, default=str))
    return row


def compare(annotator, records, gen_a: Generation, gen_b: Generation, settings: EvalSettings, progress: bool,
             samples: list[dict], **fields) -> dict:
    """One comparison of ``eval.json``: A's win rate against B with its statistics; each prompt's
    judgment row is appended to ``samples``."""
    judgments, first, seconds = judge(annotator, records, gen_a, gen_b, settings, progress=progress)
    stats = win_rate(judgments, first, n_bootstrap=settings.bootstrap, seed=settings.bootstrap_seed)
    stats["identical"] = sum(1 for j in judgments if j.extra.get("identical"))
    stats["judge_seconds"] = round(seconds, 3)
    ok = [j for j in judgments if j.ok and not j.extra.get("identical")]
    both = [j for j in ok if j.consistent is not None]
    stats["judge_consistency"] = mean([float(j.consistent) for j in both])
    for i, (j, f) in enumerate(zip(judgments, first)):
        samples[i]["judgments"].append(_judgment_row(j, f, gen_a.label, gen_b.label))
    return {"a": gen_a.label, "b": gen_b.label, **fields, **stats}
