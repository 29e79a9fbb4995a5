"""Head-to-head evaluation: how often a judge prefers model A's response to model B's.

Orchestration (models load lazily, inside the functions); the responses are
:mod:`oaif.evaluation.responses`, the judging and win rates :mod:`oaif.evaluation.judging`:

* :func:`evaluate_models` -- one response per prompt from each of two models (same seed, same
  sampling settings), each pair judged by any annotator, numbers and samples returned (and written
  as ``eval.json`` plus ``report.md`` with plots when ``out_dir`` is given).
* :func:`evaluate_run` -- the same for every ``checkpoint-N`` of a training run against the run's
  starting model, on the run's held-out prompts: a win-rate curve over training steps.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path
from typing import Sequence

from oaif.errors import ConfigError, DataError
from oaif.evaluation.judging import build_judge, compare, default_judge_cfg, describe_judge, judge_info
from oaif.evaluation.responses import (EvalSettings, Generation, filter_and_limit, generate, held_out_prompts,
                                       pick_device)
from oaif.stats import CI_LEVEL, histogram_edges

log = logging.getLogger("oaif.evaluation.evaluate")


def discover_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every complete ``checkpoint-N`` directory of a run, by step."""
    from oaif.run.checkpoint import _CKPT  # the trainer's checkpoint-name pattern

    out = []
    for p in Path(run_dir).iterdir():
        m = _CKPT.match(p.name)
        if m and p.is_dir() and (p / "config.json").is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def _new_samples(records) -> list[dict]:
    return [{"id": r.id, "prompt": r.prompt, "responses": {}, "tokens": {}, "ended_eos": {}, "judgments": []}
            for r in records]


def _add_generation(samples: list[dict], gen: Generation) -> None:
    for s, text, n, e in zip(samples, gen.texts, gen.tokens, gen.ended_eos):
        s["responses"][gen.label] = text
        s["tokens"][gen.label] = n
        s["ended_eos"][gen.label] = e


def _length_edges(gens: Sequence[Generation], settings: EvalSettings) -> tuple[list[int], list[int]]:
    tok_max = max([settings.max_new_tokens or 0] + [n for g in gens for n in g.tokens])
    char_max = max([0] + [len(t) for g in gens for t in g.texts])
    return histogram_edges(tok_max), histogram_edges(char_max)


def _finish(result: dict, out_dir, metrics: list[dict] | None = None, n_samples: int = 3) -> dict:
    if out_dir is not None:
        from oaif.evaluation.formats import write_json
        from oaif.evaluation.report import write_report

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        result["files"] = write_report(result, out, metrics=metrics, n_samples=n_samples)
        write_json(out / "eval.json", result)
    return result


def evaluate_models(model_a: str, model_b: str, prompts: Sequence, annotator_cfg=None, *,
                    settings: EvalSettings | None = None, annotator=None, limit: int | None = None,
                    labels: tuple[str, str] = ("A", "B"), prompt_source: dict | None = None,
                    out_dir: str | Path | None = None, progress: bool = True, n_samples: int = 3) -> dict:
    """Win rate of ``model_a`` against ``model_b`` on ``prompts`` (:class:`~oaif.data.PromptRecord`).

    Prompts too long for either tokenizer are skipped and counted; then the first ``limit`` are
    used. Each model answers each prompt once (same seed and settings); the judge built from
    ``annotator_cfg`` (or the given ``annotator`` object) compares the pair. Returns every
    number and the samples; with ``out_dir``, writes ``eval.json``, ``report.md`` and plots there.
    """
    from oaif.models.load import load_tokenizer

    t0 = time.perf_counter()
    annotator_cfg = default_judge_cfg(annotator_cfg, annotator)
    settings = (settings or EvalSettings()).resolved()
    _check_limit(limit)
    device = pick_device(settings.device)
    skipped: Counter = Counter((prompt_source or {}).get("skipped", {}))
    toks = [load_tokenizer(str(m), settings.cache_dir, settings.trust_remote_code) for m in (model_a, model_b)]
    records = _usable(prompts, toks, settings, limit, skipped)
    judge_obj = build_judge(annotator_cfg, annotator, settings, device)  # fails fast, before generating
    gen_a = generate(model_a, records, settings, label=labels[0], device=device, progress=progress)
    gen_b = generate(model_b, records, settings, label=labels[1], device=device, progress=progress)
    samples = _new_samples(records)
    for g in (gen_a, gen_b):
        _add_generation(samples, g)
    comparison = compare(judge_obj, records, gen_a, gen_b, settings, progress, samples)
    tok_edges, char_edges = _length_edges([gen_a, gen_b], settings)
    result = {
        "mode": "models",
        "judge": judge_info(judge_obj, annotator_cfg if annotator is None else None),
        **_inputs(settings, records, limit, skipped, prompt_source),
        "models": {g.label: g.stats(tok_edges, char_edges) for g in (gen_a, gen_b)},
        "comparisons": [comparison],
        "samples": samples,
    }
    result["seconds"] = round(time.perf_counter() - t0, 3)
    return _finish(result, out_dir, n_samples=n_samples)


def evaluate_run(run_dir: str | Path, annotator_cfg=None, *, settings: EvalSettings | None = None, annotator=None,
                 prompts: Sequence | None = None, prompt_source: dict | None = None, limit: int | None = None,
                 steps: Sequence[int] | None = None, out_dir: str | Path | None = None,
                 progress: bool = True, n_samples: int = 3) -> dict:
    """Win rate of every ``checkpoint-N`` of a run against the run's starting model.

    The starting model is the run's ``model.name_or_path`` (``config.yaml``); the prompts are the
    given ``prompts``, else the run's held-out prompts (:func:`held_out_prompts`); ``steps``
    picks checkpoints (default: all). Generation settings left ``None`` come from the run's
    config (response length, chat template, system prompt, prompt length limit, dtype). The start
    model answers once; each checkpoint is loaded, answers, and is judged against it in turn.
    With ``out_dir``, writes ``eval.json``, ``report.md`` and plots (including the training
    curves of the run's ``metrics.jsonl``) there.
    """
    from oaif.models.load import load_tokenizer
    from oaif.run.checkpoint import reading_checkpoint

    t0 = time.perf_counter()
    run = Path(run_dir)
    run_cfg = _run_config(run, limit)
    annotator_cfg = default_judge_cfg(annotator_cfg, annotator)
    settings = (settings or EvalSettings()).resolved(run_cfg)
    start_model = run_cfg.model.name_or_path
    ckpts = _checkpoints(run, steps)
    device = pick_device(settings.device)
    tok = load_tokenizer(start_model, settings.cache_dir, settings.trust_remote_code)
    skipped: Counter = Counter((prompt_source or {}).get("skipped", {}))
    if prompts is None:
        prompts, prompt_source = held_out_prompts(run_cfg, tok)
    records = _usable(prompts, [tok], settings, limit, skipped)
    judge_obj = build_judge(annotator_cfg, annotator, settings, device)
    start = generate(start_model, records, settings, label="start", device=device, progress=progress)
    samples = _new_samples(records)
    _add_generation(samples, start)
    gens, curve = [start], []
    for step, path in list(ckpts):
        with reading_checkpoint(path) as present:  # a training run's rotation (train.keep_last) waits, or was first
            gen = present and generate(str(path), records, settings, label=path.name, device=device, progress=progress)
        if not gen:
            log.warning("%s was removed (train.keep_last) before it could be evaluated: skipped", path)
            ckpts.remove((step, path))
            continue
        _add_generation(samples, gen)
        gens.append(gen)
        curve.append(compare(judge_obj, records, gen, start, settings, progress, samples, step=step,
                             checkpoint=str(path)))
    tok_edges, char_edges = _length_edges(gens, settings)
    models = {g.label: g.stats(tok_edges, char_edges) for g in gens}
    models["start"]["step"] = 0
    for step, path in ckpts:
        models[path.name]["step"] = step
    metrics_path = run / "metrics.jsonl"
    metrics = None
    if metrics_path.is_file():
        from oaif.run.metrics import read_metrics

        metrics = read_metrics(metrics_path)
    result = {
        "mode": "run",
        "run": str(run),
        "start_model": start_model,
        "judge": _run_judge_info(judge_obj, annotator_cfg, annotator, run_cfg),
        **_inputs(settings, records, limit, skipped, prompt_source),
        "models": models,
        "comparisons": curve,
        "training": _training_summary(metrics, metrics_path),
        "samples": samples,
    }
    result["seconds"] = round(time.perf_counter() - t0, 3)
    return _finish(result, out_dir, metrics=metrics, n_samples=n_samples)


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {limit}")


def _usable(prompts: Sequence, tokenizers, settings: EvalSettings, limit: int | None, skipped: Counter) -> list:
    records = filter_and_limit(list(prompts), tokenizers, settings, limit, skipped)
    if not records:
        raise DataError(f"no usable prompts (skipped: {dict(skipped) or 'none'})")
    return records


def _inputs(settings: EvalSettings, records: list, limit: int | None, skipped: Counter,
            prompt_source: dict | None) -> dict:
    """What both modes record about their prompts, generation settings and bootstrap."""
    return {
        "prompts": {**(prompt_source or {}), "count": len(records), "limit": limit, "skipped": dict(sorted(skipped.items()))},
        "generation": settings.generation(),
        "bootstrap": {"resamples": settings.bootstrap, "seed": settings.bootstrap_seed, "level": CI_LEVEL,
                      "method": "percentile, resampling prompts"},
    }


def _run_config(run: Path, limit: int | None):
    """The run's saved config (``config.yaml``), after checking the run directory and ``limit``."""
    from oaif.config import load_config

    if not run.is_dir():
        raise DataError(f"run directory not found: {run}")
    if not (run / "config.yaml").is_file():
        raise DataError(f"{run} has no config.yaml (is it a run's train.output_dir?)")
    _check_limit(limit)
    return load_config(run / "config.yaml")


def _checkpoints(run: Path, steps: Sequence[int] | None) -> list[tuple[int, Path]]:
    """The run's checkpoints that ``steps`` picks (all when None); a step without one is a DataError."""
    ckpts = discover_checkpoints(run)
    if not ckpts:
        raise DataError(f"{run} has no checkpoint-N directories")
    if steps:
        have = {s for s, _ in ckpts}
        missing = sorted(set(steps) - have)
        if missing:
            raise DataError(f"{run} has no checkpoint for step(s) {', '.join(map(str, missing))} "
                            f"(it has {', '.join(str(s) for s, _ in ckpts)})")
        ckpts = [(s, p) for s, p in ckpts if s in set(steps)]
    return ckpts


def _run_judge_info(judge_obj, annotator_cfg, annotator, run_cfg) -> dict:
    """:func:`judge_info`, plus the judge the run trained with and whether it is the same one."""
    from oaif.redaction import redact

    training_judge = redact(describe_judge(run_cfg.annotator)) if run_cfg.train.mode == "online" else "none (offline run)"
    info = judge_info(judge_obj, annotator_cfg if annotator is None else None)
    info["training_judge"] = training_judge
    info["same_as_training"] = annotator is None and run_cfg.train.mode == "online" and \
        info["description"] == training_judge  # both redacted (the run's config.yaml holds the redacted URL)
    return info


TRAINING_KEYS = ("loss", "logratio_margin", "reward_accuracy", "kl", "judge_consistency", "judge_confidence",
                 "response_length", "eos_rate", "pairs_failed")


def _training_summary(metrics: list[dict] | None, path: Path) -> dict | None:
    if not metrics:
        return None
    keys = [k for k in TRAINING_KEYS if any(isinstance(m.get(k), (int, float)) for m in metrics)]
    return {"metrics": str(path), "steps": len(metrics), "keys": keys,
            "series": {k: [[m.get("step"), m.get(k)] for m in metrics if isinstance(m.get(k), (int, float))]
                       for k in keys}}
