"""Head-to-head evaluation: how often a judge prefers model A's response to model B's.

:func:`win_rate` -- per prompt, the judge's P(A better) ``p`` scores 1 if ``p > 0.5``, 1/2 if
``p == 0.5`` and 0 otherwise; the win rate is the mean score over judged prompts, with the mean
probability next to it, each with a percentile bootstrap interval over prompts (seeded, 1000
resamples by default). Failed judgments are left out and counted by reason. The statistics
themselves (scores, bootstrap, length distributions) are :mod:`oaif.stats`.

Orchestration (models load lazily, inside the functions):

* :func:`evaluate_models` -- one response per prompt from each of two models (same seed, same
  sampling settings), each pair judged by any annotator, numbers and samples returned (and written
  as ``eval.json`` plus ``report.md`` with plots when ``out_dir`` is given).
* :func:`evaluate_run` -- the same for every ``checkpoint-N`` of a training run against the run's
  starting model, on the run's held-out prompts: a win-rate curve over training steps.

A pair whose two responses are identical is a tie by definition: it scores 1/2 without asking the
judge (``judge = "identical"``). To keep a judge that reads one order only from favouring either
model by its position bias, model A's response is sent as ``a`` for even prompt indices and as
``b`` for odd ones (``a_is_first``); judges that read both orders average them anyway.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from oaif.errors import ConfigError, DataError
from oaif.stats import CI_LEVEL, bootstrap_ci, histogram_edges, length_stats, mean, outcomes, score

log = logging.getLogger("oaif.evaluation.evaluate")


# --------------------------------------------------------------------------------------------
# the win rate
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# options
# --------------------------------------------------------------------------------------------
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


@dataclass
class EvalSettings:
    """How responses are generated and statistics computed. ``None`` fields are resolved by
    :meth:`resolved`: from the run's config in run mode, else from the defaults in brackets."""

    temperature: float = 0.7          # sampling temperature (same seed and settings for every model)
    top_p: float = 1.0
    max_new_tokens: int | None = None  # [64]; run mode: the run's sampling.max_new_tokens
    seed: int = 0                      # sampling seed; response i of every model uses row seed (seed, i, 0)
    batch_size: int = 16               # prompts per generation batch, pairs per judge call
    chat_template: bool | None = None  # [True]; run mode: the run's model.chat_template
    system_prompt: str | None = None   # [none]; run mode: the run's model.system_prompt
    max_prompt_tokens: int | None = None  # [512]; run mode: the run's data.max_prompt_tokens
    dtype: str | None = None           # [float32]; run mode: the run's model.dtype
    device: str = "auto"               # auto, cpu or cuda
    bootstrap: int = 1000              # bootstrap resamples
    bootstrap_seed: int = 0
    cache_dir: str | None = None
    trust_remote_code: bool = False

    def resolved(self, run_cfg=None) -> "EvalSettings":
        s = dataclasses.replace(self)
        if run_cfg is not None:
            defaults = {"max_new_tokens": run_cfg.sampling.max_new_tokens, "chat_template": run_cfg.model.chat_template,
                        "system_prompt": run_cfg.model.system_prompt, "max_prompt_tokens": run_cfg.data.max_prompt_tokens,
                        "dtype": run_cfg.model.dtype}
            if s.cache_dir is None:
                s.cache_dir = run_cfg.model.cache_dir
            s.trust_remote_code = s.trust_remote_code or run_cfg.model.trust_remote_code
        else:
            defaults = {"max_new_tokens": 64, "chat_template": True, "system_prompt": None, "max_prompt_tokens": 512,
                        "dtype": "float32"}
        for k, v in defaults.items():
            if getattr(s, k) is None:
                setattr(s, k, v)
        s.check()
        return s

    def check(self) -> None:
        checks = [
            ("--temperature", self.temperature > 0, "must be > 0"),
            ("--top-p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("--max-new-tokens", self.max_new_tokens is None or self.max_new_tokens >= 1, "must be >= 1"),
            ("--max-prompt-tokens", self.max_prompt_tokens is None or self.max_prompt_tokens >= 1, "must be >= 1"),
            ("--batch-size", self.batch_size >= 1, "must be >= 1"),
            ("--bootstrap", self.bootstrap >= 1, "must be >= 1"),
            ("--device", self.device in ("auto", "cpu", "cuda"), "must be auto, cpu or cuda"),
            ("--dtype", self.dtype in (None, "float32", "bfloat16", "float16", "auto"),
             "must be float32, bfloat16, float16 or auto"),
        ]
        for flag, ok, msg in checks:
            if not ok:
                value = getattr(self, flag[2:].replace("-", "_"))
                raise ConfigError(f"{flag} {msg}, got {value!r}")

    def generation(self) -> dict:
        return {"responses_per_prompt": 1, "temperature": self.temperature, "top_p": self.top_p,
                "max_new_tokens": self.max_new_tokens, "seed": self.seed, "batch_size": self.batch_size,
                "chat_template": self.chat_template, "system_prompt": self.system_prompt,
                "max_prompt_tokens": self.max_prompt_tokens, "dtype": self.dtype}


def _device(name: str):
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but no CUDA device is available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


# --------------------------------------------------------------------------------------------
# prompts
# --------------------------------------------------------------------------------------------
def _filter_and_limit(records, tokenizers, settings: EvalSettings, limit: int | None, skipped: Counter) -> list:
    """Drop (and count as ``too_long``) prompts over ``max_prompt_tokens`` for any of the
    tokenizers, then keep the first ``limit``."""
    from oaif.models import encode_prompt

    kept = []
    for rec in records:
        if limit is not None and len(kept) >= limit:
            break
        if any(len(encode_prompt(tok, rec.prompt, settings.chat_template, settings.system_prompt))
               > settings.max_prompt_tokens for tok in tokenizers):
            skipped["too_long"] += 1
            continue
        kept.append(rec)
    return kept


def held_out_prompts(run_cfg, tokenizer=None) -> tuple[list, dict]:
    """The run's held-out prompts, exactly as :class:`oaif.trainer.Trainer` chose them: both call
    :func:`oaif.data.training_prompts` (``data.eval_path`` when set; otherwise the ``data.eval_fraction``
    split, with ``train.seed``, of the prompts of ``data.path`` that fit in ``data.max_prompt_tokens``
    with the run's chat template and system prompt). Returns ``(records, source)`` where ``source``
    describes where they came from.
    """
    from oaif import data as data_mod
    from oaif.models import encode_prompt, load_tokenizer

    d = run_cfg.data
    if d.eval_path and not Path(d.eval_path).exists():
        raise DataError(f"the run's data.eval_path is not found: {d.eval_path} (pass --prompts FILE)")
    if not d.eval_path and d.eval_fraction <= 0:
        raise DataError("the run held out no prompts (data.eval_fraction=0 and no data.eval_path); "
                        "pass --prompts FILE")
    if not Path(d.path).exists():
        raise DataError(f"the run's prompt file is not found: {d.path} (run from the directory the run was "
                        f"started in, or pass --prompts FILE)")
    if tokenizer is None:
        tokenizer = load_tokenizer(run_cfg.model.name_or_path, run_cfg.model.cache_dir, run_cfg.model.trust_remote_code)
    split = data_mod.training_prompts(d, "online", run_cfg.train.seed, lambda prompt: encode_prompt(
        tokenizer, prompt, run_cfg.model.chat_template, run_cfg.model.system_prompt))
    if d.eval_path:
        return split.held_out, {"kind": "run eval_path", "path": str(d.eval_path)}
    return split.held_out, {"kind": "run eval split", "path": str(d.path), "eval_fraction": d.eval_fraction,
                            "seed": run_cfg.train.seed, "split_of": split.usable}


def discover_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every complete ``checkpoint-N`` directory of a run, by step."""
    from oaif.run.checkpoint import _CKPT  # the trainer's checkpoint-name pattern

    out = []
    for p in Path(run_dir).iterdir():
        m = _CKPT.match(p.name)
        if m and p.is_dir() and (p / "config.json").is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


# --------------------------------------------------------------------------------------------
# generation and judging
# --------------------------------------------------------------------------------------------
@dataclass
class Generation:
    """One response per prompt from one model."""

    label: str
    model: str
    texts: list[str]
    tokens: list[int]       # generated tokens, EOS included when the response ended (as the trainer counts)
    ended_eos: list[bool]
    seconds: float = 0.0

    def stats(self, token_edges=None, char_edges=None) -> dict:
        return {"model": self.model, "tokens": length_stats(self.tokens, token_edges),
                "chars": length_stats([len(t) for t in self.texts], char_edges),
                "eos_rate": mean([float(e) for e in self.ended_eos]), "generate_seconds": round(self.seconds, 3)}


def generate(model_path: str, records: Sequence, settings: EvalSettings, *, label: str, device=None,
             progress: bool = True) -> Generation:
    """Load ``model_path`` and sample one response per prompt (batched, seeded by prompt index)."""
    import torch
    from tqdm.auto import tqdm

    from oaif.models import encode_prompt, load_causal_lm
    from oaif.step.sampling import sample_responses

    t0 = time.perf_counter()
    device = device if device is not None else _device(settings.device)
    model, tok = load_causal_lm(str(model_path), settings.dtype, settings.cache_dir, settings.trust_remote_code)
    model.to(device)
    texts, tokens, ended = [], [], []
    try:
        prompt_tokens = [encode_prompt(tok, r.prompt, settings.chat_template, settings.system_prompt) for r in records]
        step = settings.batch_size
        with tqdm(total=len(records), unit="prompt", desc=f"generate {label}", disable=not progress,
                  dynamic_ncols=True, mininterval=1.0) as bar:
            for start in range(0, len(records), step):
                chunk = prompt_tokens[start:start + step]
                responses, eos = sample_responses(model, tok, chunk, list(range(start, start + len(chunk))), k=1,
                                                  seed=settings.seed, temperature=settings.temperature,
                                                  top_p=settings.top_p, max_new_tokens=settings.max_new_tokens)
                for rs, es in zip(responses, eos):
                    texts.append(tok.decode(rs[0], skip_special_tokens=True).strip())
                    tokens.append(len(rs[0]))
                    ended.append(bool(es[0]))
                bar.update(len(chunk))
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return Generation(label, str(model_path), texts, tokens, ended, time.perf_counter() - t0)


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


def _compare(annotator, records, gen_a: Generation, gen_b: Generation, settings: EvalSettings, progress: bool,
             samples: list[dict], **fields) -> dict:
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


def _default_cfg(annotator_cfg, annotator):
    """The default judge config (``oaif config keys``: the in-process SmolLM2, helpful rubric) when
    neither a config nor an annotator object is given."""
    if annotator is None and annotator_cfg is None:
        from oaif.config import AnnotatorConfig

        return AnnotatorConfig()
    return annotator_cfg


def _build_annotator(annotator_cfg, annotator, settings: EvalSettings, device):
    if annotator is not None:
        return annotator
    from oaif.annotators.build import build_annotator

    return build_annotator(annotator_cfg, cache_dir=settings.cache_dir, device=device)


def _judge_info(annotator, annotator_cfg) -> dict:
    from oaif.redaction import redact  # no credentials from a URL in eval.json and report.md

    return redact({"name": getattr(annotator, "name", type(annotator).__name__),
                   "description": describe_judge(annotator_cfg),
                   "config": dataclasses.asdict(annotator_cfg) if annotator_cfg is not None else None})


def _finish(result: dict, out_dir, metrics: list[dict] | None = None, n_samples: int = 3) -> dict:
    if out_dir is not None:
        from oaif.evaluation.report import write_json, write_report

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        result["files"] = write_report(result, out, metrics=metrics, n_samples=n_samples)
        write_json(out / "eval.json", result)
    return result


# --------------------------------------------------------------------------------------------
# orchestration
# --------------------------------------------------------------------------------------------
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
    from oaif.models import load_tokenizer

    t0 = time.perf_counter()
    annotator_cfg = _default_cfg(annotator_cfg, annotator)
    settings = (settings or EvalSettings()).resolved()
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {limit}")
    device = _device(settings.device)
    skipped: Counter = Counter((prompt_source or {}).get("skipped", {}))
    toks = [load_tokenizer(str(m), settings.cache_dir, settings.trust_remote_code) for m in (model_a, model_b)]
    records = _filter_and_limit(list(prompts), toks, settings, limit, skipped)
    if not records:
        raise DataError(f"no usable prompts (skipped: {dict(skipped) or 'none'})")
    judge_obj = _build_annotator(annotator_cfg, annotator, settings, device)  # fails fast, before generating
    gen_a = generate(model_a, records, settings, label=labels[0], device=device, progress=progress)
    gen_b = generate(model_b, records, settings, label=labels[1], device=device, progress=progress)
    samples = _new_samples(records)
    for g in (gen_a, gen_b):
        _add_generation(samples, g)
    comparison = _compare(judge_obj, records, gen_a, gen_b, settings, progress, samples)
    tok_edges, char_edges = _length_edges([gen_a, gen_b], settings)
    result = {
        "mode": "models",
        "judge": _judge_info(judge_obj, annotator_cfg if annotator is None else None),
        "prompts": {**(prompt_source or {}), "count": len(records), "limit": limit, "skipped": dict(sorted(skipped.items()))},
        "generation": settings.generation(),
        "bootstrap": {"resamples": settings.bootstrap, "seed": settings.bootstrap_seed, "level": CI_LEVEL,
                      "method": "percentile, resampling prompts"},
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
    from oaif.config import load_config
    from oaif.models import load_tokenizer

    t0 = time.perf_counter()
    run = Path(run_dir)
    if not run.is_dir():
        raise DataError(f"run directory not found: {run}")
    if not (run / "config.yaml").is_file():
        raise DataError(f"{run} has no config.yaml (is it a run's train.output_dir?)")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {limit}")
    run_cfg = load_config(run / "config.yaml")
    annotator_cfg = _default_cfg(annotator_cfg, annotator)
    settings = (settings or EvalSettings()).resolved(run_cfg)
    start_model = run_cfg.model.name_or_path
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
    device = _device(settings.device)
    tok = load_tokenizer(start_model, settings.cache_dir, settings.trust_remote_code)
    skipped: Counter = Counter((prompt_source or {}).get("skipped", {}))
    if prompts is None:
        prompts, prompt_source = held_out_prompts(run_cfg, tok)
    records = _filter_and_limit(list(prompts), [tok], settings, limit, skipped)
    if not records:
        raise DataError(f"no usable prompts (skipped: {dict(skipped) or 'none'})")
    judge_obj = _build_annotator(annotator_cfg, annotator, settings, device)
    start = generate(start_model, records, settings, label="start", device=device, progress=progress)
    samples = _new_samples(records)
    _add_generation(samples, start)
    gens, curve = [start], []
    for step, path in ckpts:
        gen = generate(str(path), records, settings, label=path.name, device=device, progress=progress)
        _add_generation(samples, gen)
        gens.append(gen)
        curve.append(_compare(judge_obj, records, gen, start, settings, progress, samples, step=step,
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
    training_judge = describe_judge(run_cfg.annotator) if run_cfg.train.mode == "online" else "none (offline run)"
    judge_info = _judge_info(judge_obj, annotator_cfg if annotator is None else None)
    judge_info["training_judge"] = training_judge
    judge_info["same_as_training"] = annotator is None and run_cfg.train.mode == "online" and \
        judge_info["description"] == training_judge  # both redacted
    result = {
        "mode": "run",
        "run": str(run),
        "start_model": start_model,
        "judge": judge_info,
        "prompts": {**(prompt_source or {}), "count": len(records), "limit": limit, "skipped": dict(sorted(skipped.items()))},
        "generation": settings.generation(),
        "bootstrap": {"resamples": settings.bootstrap, "seed": settings.bootstrap_seed, "level": CI_LEVEL,
                      "method": "percentile, resampling prompts"},
        "models": models,
        "comparisons": curve,
        "training": _training_summary(metrics, metrics_path),
        "samples": samples,
    }
    result["seconds"] = round(time.perf_counter() - t0, 3)
    return _finish(result, out_dir, metrics=metrics, n_samples=n_samples)


TRAINING_KEYS = ("loss", "logratio_margin", "reward_accuracy", "kl", "judge_consistency", "judge_confidence",
                 "response_length", "eos_rate", "pairs_failed")


def _training_summary(metrics: list[dict] | None, path: Path) -> dict | None:
    if not metrics:
        return None
    keys = [k for k in TRAINING_KEYS if any(isinstance(m.get(k), (int, float)) for m in metrics)]
    return {"metrics": str(path), "steps": len(metrics), "keys": keys,
            "series": {k: [[m.get("step"), m.get(k)] for m in metrics if isinstance(m.get(k), (int, float))]
                       for k in keys}}
