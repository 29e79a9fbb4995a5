"""The checks that types alone don't capture: choices, ranges, finite numbers, and the annotator
group (ensemble members under their own key). The first problem is a :class:`ConfigError` naming its key."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from oaif.config.overrides import apply_mapping, flatten, short
from oaif.config.schema import POLICY_JUDGE, AnnotatorConfig, Config, LossConfig
from oaif.errors import ConfigError


_CHOICES = {
    "model.dtype": {"float32", "bfloat16", "float16", "auto"},
    "data.format": {"auto", "jsonl", "csv", "parquet", "hf_disk"},
    "sampling.pairing": {"disjoint", "all", "best_worst"},
    "sampling.backend": {"shared_prefill", "hf", "vllm"},
    "annotator.type": {"llm", "callable", "openai", "reward_model", "ensemble"},
    "annotator.ensemble_mode": {"mean", "majority"},
    "annotator.dtype": {"float32", "bfloat16", "float16", "auto"},
    "loss.type": {"dpo", "ipo", "slic", "simpo", "rpo", "rdpo"},
    "loss.reference": {"initial", "behavior"},
    "optim.scheduler": {"constant", "linear", "cosine"},
    "train.mode": {"online", "offline"},
    "train.device": {"auto", "cpu", "cuda"},
    "train.mixed_precision": {"no", "bf16", "fp16"},
}


def validate(cfg: Config) -> Config:
    """Check the choice fields and value ranges that types alone don't capture.

    Every number must be finite; every key has a range (see the checks below). The first
    problem found raises a :class:`ConfigError` naming its key.
    """
    _check_finite(cfg)
    flat = flatten(cfg.to_dict())
    for key, choices in _CHOICES.items():
        if flat[key] not in choices:
            raise ConfigError(f"{key}: must be one of {', '.join(sorted(choices))}, got {flat[key]!r}")
    checks = [
        ("model.name_or_path", cfg.model.name_or_path.strip(), "must name a model"),
        ("model.dtype", cfg.model.dtype != "float16" or cfg.model.lora.enabled,
         "float16 with full fine-tuning is refused: AdamW keeps its state in the weights' dtype, where "
         "optim.eps rounds to 0 and small squared gradients underflow, so the weights turn non-finite after a "
         "step; use model.dtype=bfloat16, or float32 weights with train.mixed_precision=fp16 (GPU), or "
         "model.lora.enabled=true"),
        ("model.lora.r", cfg.model.lora.r >= 1, "must be >= 1"),
        ("model.lora.alpha", cfg.model.lora.alpha > 0, "must be > 0"),
        ("model.lora.dropout", 0 <= cfg.model.lora.dropout < 1, "must be in [0, 1)"),
        ("model.lora.target_modules", len(cfg.model.lora.target_modules) >= 1 and all(
            isinstance(m, str) and m.strip() for m in cfg.model.lora.target_modules),
         "must be a non-empty list of module names"),
        ("data.path", cfg.train.mode != "online" or cfg.data.path.strip(), "must name a prompt file"),
        ("data.field", cfg.data.field.strip(), "must name a column"),
        ("data.max_prompt_tokens", cfg.data.max_prompt_tokens >= 1, "must be >= 1"),
        ("data.eval_path", cfg.data.eval_path is None or cfg.data.eval_path.strip(), "is empty (use null for none)"),
        ("sampling.num_samples", cfg.sampling.num_samples >= 2, "must be >= 2"),
        ("sampling.num_samples", cfg.sampling.pairing != "disjoint" or cfg.sampling.num_samples % 2 == 0,
         "must be even with sampling.pairing=disjoint"),
        ("sampling.num_samples", cfg.sampling.pairing != "best_worst" or cfg.sampling.num_samples >= 3,
         "must be >= 3 with sampling.pairing=best_worst (with 2 responses the best and the worst are the judged pair: "
         "use disjoint)"),
        ("sampling.pairing", cfg.sampling.pairing != "best_worst" or cfg.train.mode == "online",
         "best_worst ranks sampled responses: it needs train.mode=online (offline mode trains on the file's pairs)"),
        ("sampling.temperature", cfg.sampling.temperature > 0, "must be > 0"),
        ("sampling.top_p", 0 < cfg.sampling.top_p <= 1, "must be in (0, 1]"),
        ("sampling.max_new_tokens", cfg.sampling.max_new_tokens >= 1, "must be >= 1"),
        ("sampling.batch_size", cfg.sampling.batch_size >= 0, "must be >= 0 (0: all prompts of a step at once)"),
        ("loss.beta", cfg.loss.beta > 0, "must be > 0"),
        ("loss.min_confidence", 0 <= cfg.loss.min_confidence < 0.5, "must be in [0, 0.5)"),
        *_loss_checks(cfg.loss),
        *_reference_checks(cfg.loss, cfg.train.mode),
        ("optim.lr", 0 <= cfg.optim.lr <= 1e30, "must be in [0, 1e30] (a larger step overflows float32 in AdamW)"),
        ("optim.weight_decay", cfg.optim.weight_decay >= 0, "must be >= 0"),
        ("optim.betas", _is_betas(cfg.optim.betas), f"must be two numbers in [0, 1), got {cfg.optim.betas!r}"),
        ("optim.eps", cfg.optim.eps > 0, "must be > 0"),
        ("optim.warmup_steps", cfg.optim.warmup_steps >= 0, "must be >= 0"),
        ("optim.max_grad_norm", cfg.optim.max_grad_norm >= 0, "must be >= 0 (0 disables clipping)"),
        ("train.max_steps", cfg.train.max_steps >= 1, "must be >= 1"),
        ("train.batch_size", cfg.train.batch_size >= 1, "must be >= 1"),
        ("train.gradient_accumulation_steps", cfg.train.gradient_accumulation_steps >= 1, "must be >= 1"),
        ("train.seed", 0 <= cfg.train.seed < 2**32, "must be in [0, 2**32 - 1]"),
        ("train.output_dir", cfg.train.output_dir.strip(), "must name a directory (an empty value would write "
                                                           "into the current directory)"),
        ("train.save_every", cfg.train.save_every >= 0, "must be >= 0 (0: only at the end)"),
        ("train.keep_last", cfg.train.keep_last >= 0, "must be >= 0 (0: keep all)"),
        ("train.forward_batch_size", cfg.train.forward_batch_size >= 0, "must be >= 0"),
        ("train.logprob_gap_warn", cfg.train.logprob_gap_warn is None or cfg.train.logprob_gap_warn >= 0,
         "must be >= 0 (0: no warning; null: by precision)"),
        *_async_checks(cfg),
        ("data.eval_fraction", 0 <= cfg.data.eval_fraction < 1, "must be in [0, 1)"),
        ("train.mode", cfg.train.mode != "offline" or cfg.data.preference_path,
         "offline mode needs data.preference_path"),
        ("loss.missing_eos_penalty", cfg.loss.missing_eos_penalty >= 0, "must be >= 0 (.inf: an unfinished response loses)"),
        ("model.lora.dropout", not (cfg.model.lora.enabled and cfg.model.disable_dropout and cfg.model.lora.dropout > 0),
         "has no effect with model.disable_dropout=true (set model.disable_dropout=false to use it)"),
        ("train.resume", not isinstance(cfg.train.resume, str) or bool(cfg.train.resume.strip()),
         "must be true, false or a checkpoint directory"),
        ("logging.run_name", cfg.logging.run_name is None or cfg.logging.run_name.strip(), "is empty (use null for the default)"),
    ]
    _raise_first(checks)
    known = set(flat)
    for key in cfg.train.resume_allow_changes:
        if not isinstance(key, str) or key not in known:
            raise ConfigError(f"train.resume_allow_changes: {short(key)} is not a config key (see `oaif config keys`)")
    cfg.vllm.validate()
    for tracker in cfg.logging.report_to:
        if tracker not in ("tensorboard", "wandb"):
            raise ConfigError(f"logging.report_to: unknown tracker {tracker!r} (tensorboard, wandb)")
    _validate_annotator(cfg.annotator, "annotator.")
    return cfg


#: The keys that only one loss.type reads (loss.beta: every type but simpo).
_LOSS_KEYS = {"simpo_beta": ("simpo",), "simpo_gamma_beta_ratio": ("simpo",), "rpo_alpha": ("rpo",),
              "rdpo_alpha": ("rdpo",), "beta": ("dpo", "ipo", "slic", "rpo", "rdpo")}


def _loss_checks(loss: LossConfig) -> list:
    """Ranges of the losses' own keys; a key set away from its default under a loss.type that does not read it
    is refused (it would be silently ignored), as is label smoothing where it has no defined form."""
    defaults = {f.name: f.default for f in dataclasses.fields(LossConfig)}
    checks = [
        ("loss.simpo_beta", loss.simpo_beta > 0, "must be > 0"),
        ("loss.simpo_gamma_beta_ratio", loss.simpo_gamma_beta_ratio >= 0, "must be >= 0"),
        ("loss.rpo_alpha", loss.rpo_alpha >= 0, "must be >= 0"),
        ("loss.rdpo_alpha", loss.rdpo_alpha >= 0, "must be >= 0 (a negative alpha would reward length)"),
        ("loss.label_smoothing", 0 <= loss.label_smoothing < 0.5, "must be in [0, 0.5)"),
        ("loss.label_smoothing", loss.label_smoothing == 0 or loss.type in ("dpo", "ipo"),
         f"applies to loss.type dpo and ipo (cDPO and its IPO form), not {loss.type}; "
         "loss.soft_labels trains on the judge's own probabilities with any loss"),
    ]
    for key, types in _LOSS_KEYS.items():
        hint = " (its scale is loss.simpo_beta)" if key == "beta" else ""
        checks.append((f"loss.{key}", loss.type in types or getattr(loss, key) == defaults[key],
                       f"has no effect with loss.type={loss.type}{hint}; it is read by loss.type "
                       f"{' or '.join(types)}"))
    return checks


def _reference_checks(loss: LossConfig, mode: str) -> list:
    """The reference's keys (docs/methods.md's table): ranges, and settings that would be silently ignored."""
    defaults = {f.name: f.default for f in dataclasses.fields(LossConfig)}
    checks = [
        ("loss.reference_sync_every", loss.reference_sync_every >= 0, "must be >= 0 (0: never)"),
        ("loss.reference_mix", 0 <= loss.reference_mix <= 1, "must be in [0, 1] (0: no soft update)"),
        ("loss.reference", loss.reference != "behavior" or mode == "online",
         "behavior is the policy that sampled the step's responses, and offline mode samples none (use "
         "train.mode=online, or TR-DPO's loss.reference_sync_every / loss.reference_mix)"),
    ]
    for key in ("reference", "reference_sync_every", "reference_mix"):
        checks.append((f"loss.{key}", loss.type != "simpo" or getattr(loss, key) == defaults[key],
                       "has no effect with loss.type=simpo, which has no reference model"))
    for key in ("reference_sync_every", "reference_mix"):
        checks.append((f"loss.{key}", loss.reference != "behavior" or getattr(loss, key) == defaults[key],
                       "has no effect with loss.reference=behavior (the reference is already the policy before "
                       "each step); TR-DPO moves loss.reference=initial"))
    return checks


def _judges_with_policy(a: AnnotatorConfig) -> bool:
    """Whether the annotator or one of its ensemble members is the policy being trained (self-judging)."""
    return a.model == POLICY_JUDGE or any(isinstance(m, dict) and m.get("model") == POLICY_JUDGE for m in a.members)


def _async_checks(cfg: Config) -> list:
    """What ``train.async_steps`` cannot do correctly (a vLLM server shared by several processes is refused where
    the sampler is built, :func:`oaif.generation.build.build_sampler`, once the process count is known)."""
    n = cfg.train.async_steps
    return [
        ("train.async_steps", n >= 0, "must be >= 0 (0: synchronous)"),
        ("train.async_steps", n == 0 or cfg.train.mode == "online",
         "offline mode samples and judges nothing, so there is nothing to run ahead (use 0)"),
        ("train.async_steps", n == 0 or not _judges_with_policy(cfg.annotator),
         "annotator.model=policy judges with the policy being trained, which the background worker cannot read "
         "while the step updates it (use 0, or another judge model)"),
        ("train.async_steps", n == 0 or cfg.loss.reference != "behavior",
         "loss.reference=behavior takes the policy before the step as the weights that sampled, but with "
         "async_steps the batch was sampled by weights up to async_steps steps older (use 0, or loss.reference=initial)"),
        ("train.async_steps", n == 0 or not cfg.train.fsdp,
         "not yet with train.fsdp: sharded weights are gathered by every process together, which the background "
         "worker cannot join (use 0, or train.fsdp=false)"),
    ]


def _raise_first(checks: list) -> None:
    for key, ok, msg in checks:
        if not ok:
            raise ConfigError(f"{key}: {msg}")


def _is_betas(betas: list) -> bool:
    return (len(betas) == 2 and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in betas)
            and all(0 <= b < 1 for b in betas))


#: Keys where +inf is a meaningful setting (NaN never is).
_INFINITY_ALLOWED = {"loss.missing_eos_penalty": ".inf: an unfinished response loses"}


def _check_finite(obj: Any, prefix: str = "") -> None:
    """Every float of a config group (and every number in a list of numbers) must be finite,
    except +inf where :data:`_INFINITY_ALLOWED` gives it a meaning."""
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            _check_finite(value, key + ".")
        elif isinstance(value, float) and key in _INFINITY_ALLOWED and not math.isfinite(value):
            if value == math.inf:
                continue
            raise ConfigError(f"{key}: must be a number or .inf, got {value} ({_INFINITY_ALLOWED[key]})")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}: must be a finite number, got {value}")
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, float) and not math.isfinite(item):
                    raise ConfigError(f"{key}: must hold finite numbers, got {value!r}")


def _validate_annotator(a: AnnotatorConfig, prefix: str) -> None:
    """Ranges of the annotator group; ensemble members are checked the same way, under their own key."""
    k = prefix
    _raise_first([
        (k + "model", a.type not in ("llm", "reward_model", "openai") or a.model.strip(), "must name a model"),
        (k + "model", a.model != POLICY_JUDGE or a.type == "llm",
         f"'policy' (the policy judging itself) needs type=llm, got type={a.type}"
         + ("; set model: policy on its llm members" if a.type == "ensemble" else "")),
        (k + "rubric", a.type not in ("llm", "openai") or a.rubric.strip(), "must name a rubric"),
        (k + "members", a.type != "ensemble" or len(a.members) >= 1,
         "annotator.type=ensemble needs at least one member"),
        (k + "base_url", a.type != "openai" or a.base_url, "annotator.type=openai needs annotator.base_url"),
        (k + "base_url", a.type != "openai" or re.match(r"https?://[^\s/]+", a.base_url.strip()),
         f"must be an http:// or https:// URL, got {short(a.base_url)}"),
        (k + "callable", a.type != "callable" or a.callable,
         "annotator.type=callable needs annotator.callable='module:function'"),
        (k + "api_key_env", a.type != "openai" or a.api_key_env.strip(), "must name an environment variable"),
        (k + "batch_size", a.batch_size >= 1, "must be >= 1"),
        (k + "max_length", a.max_length >= 1, "must be >= 1"),
        (k + "request_timeout", a.request_timeout > 0, "must be > 0"),
        (k + "max_retries", a.max_retries >= 0, "must be >= 0"),
        (k + "concurrency", a.concurrency >= 1, "must be >= 1"),
        (k + "top_logprobs", 1 <= a.top_logprobs <= 20, "must be in [1, 20]"),
        (k + "max_failure_rate", 0 < a.max_failure_rate <= 1, "must be in (0, 1]"),
        (k + "failure_window", a.failure_window >= 1, "must be >= 1"),
        (k + "noise_window", a.noise_window >= 0, "must be >= 0 (0: no judge noise warning)"),
    ])
    for i, spec in enumerate(a.members):
        where = f"{prefix}members[{i}]"
        if not isinstance(spec, dict) or spec.get("type") == "ensemble":
            raise ConfigError(f"{where}: expected a mapping of annotator keys (not an ensemble), got {short(spec)}")
        member = dataclasses.replace(a, members=[])
        apply_mapping(member, spec, where + ".")
        _check_finite(member, where + ".")
        for key in ("type", "ensemble_mode", "dtype"):
            choices = _CHOICES[f"annotator.{key}"]
            if getattr(member, key) not in choices:
                raise ConfigError(f"{where}.{key}: must be one of {', '.join(sorted(choices))}, got {getattr(member, key)!r}")
        _validate_annotator(member, where + ".")
