"""What an evaluation compares: one response per prompt from each model, with the same settings.

:class:`EvalSettings` holds how responses are generated (the same seed and sampling settings for
every model; in run mode, unset fields come from the run's config). :func:`held_out_prompts` gives
a run's held-out prompts exactly as the trainer chose them; :func:`filter_and_limit` drops prompts
too long for any model's tokenizer. :func:`generate` loads a model and samples its responses,
seeded by prompt index, so every model answers prompt i with the same random numbers.
"""

from __future__ import annotations

import dataclasses
import gc
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from oaif.errors import ConfigError, DataError
from oaif.stats import length_stats, mean


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


def pick_device(name: str):
    """The torch device ``--device`` names (auto: CUDA when there is one); cuda without one is a ConfigError."""
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but no CUDA device is available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def filter_and_limit(records, tokenizers, settings: EvalSettings, limit: int | None, skipped: Counter) -> list:
    """Drop (and count as ``too_long``) prompts over ``max_prompt_tokens`` for any of the
    tokenizers, then keep the first ``limit``."""
    from oaif.models.chat import encode_prompt

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
    from oaif.data.split import training_prompts
    from oaif.models.chat import encode_prompt
    from oaif.models.load import load_tokenizer

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
    split = training_prompts(d, "online", run_cfg.train.seed, lambda prompt: encode_prompt(
        tokenizer, prompt, run_cfg.model.chat_template, run_cfg.model.system_prompt))
    if d.eval_path:
        return split.held_out, {"kind": "run eval_path", "path": str(d.eval_path)}
    return split.held_out, {"kind": "run eval split", "path": str(d.path), "eval_fraction": d.eval_fraction,
                            "seed": run_cfg.train.seed, "split_of": split.usable}


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

    from oaif.models.chat import encode_prompt
    from oaif.models.load import load_causal_lm
    from oaif.step.sampling import sample_responses

    t0 = time.perf_counter()
    device = device if device is not None else pick_device(settings.device)
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
