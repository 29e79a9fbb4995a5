"""Typed run configuration: grouped dataclasses, loaded from YAML, with ``key.sub=value`` overrides.

Every field carries its help text in ``metadata["help"]``; ``oaif config --help-fields`` prints it.
Loading is strict: an unknown key, a value of the wrong type, or a missing file is a
:class:`ConfigError` whose one-line message names the offending key.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from oaif.errors import ConfigError


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


def _group(cls: type, help: str) -> Any:
    return field(default_factory=cls, metadata={"help": help})


@dataclass
class LoraConfig:
    enabled: bool = _f(False, "Train a LoRA adapter (peft) instead of all weights; the reference is the base with the adapter disabled.")
    r: int = _f(16, "LoRA rank.")
    alpha: int = _f(32, "LoRA alpha (scaling = alpha / r).")
    dropout: float = _f(0.0, "Dropout on the LoRA branch.")
    target_modules: list = _f(["q_proj", "k_proj", "v_proj", "o_proj"], "Module names that get adapters.")


@dataclass
class ModelConfig:
    name_or_path: str = _f("smollm2-135m-instruct", "Policy: a Hugging Face id, a local directory, a .gguf file, or 'smollm2-135m-instruct' (embedded).")
    dtype: str = _f("float32", "Weights dtype: float32, bfloat16, float16 or auto.")
    cache_dir: str | None = _f(None, "Where converted GGUF models are cached (default: $OAIF_CACHE or ~/.cache/oaif).")
    chat_template: bool = _f(True, "Apply the tokenizer's chat template to prompts.")
    system_prompt: str | None = _f(None, "Optional system message prepended to every prompt.")
    gradient_checkpointing: bool = _f(False, "Trade compute for memory in the policy's backward pass.")
    trust_remote_code: bool = _f(False, "Allow custom model code from the model directory.")
    disable_dropout: bool = _f(True, "Turn off every dropout in the policy and reference (as TRL does): a policy with dropout would disagree with the reference on identical weights, biasing the margin and KL.")
    lora: LoraConfig = _group(LoraConfig, "LoRA adapter settings.")


@dataclass
class DataConfig:
    path: str = _f("data/prompts/demo_prompts.jsonl", "Prompt file (JSONL, CSV, Parquet) or a `datasets.save_to_disk` directory.")
    format: str = _f("auto", "auto, jsonl, csv, parquet or hf_disk.")
    field: str = _f("prompt", "Column holding the prompt: plain text or a list of chat messages.")
    max_prompt_tokens: int = _f(256, "Prompts longer than this (after the chat template) are skipped and counted.")
    eval_fraction: float = _f(0.0, "Fraction of prompts held out for evaluation (0 disables the split).")
    eval_path: str | None = _f(None, "Separate held-out prompt file (overrides eval_fraction).")
    shuffle: bool = _f(True, "Shuffle prompts each epoch (deterministic from train.seed).")
    preference_path: str | None = _f(None, "Offline mode: JSONL of prompt, chosen, rejected and optional probability.")


@dataclass
class SamplingConfig:
    num_samples: int = _f(2, "Responses sampled per prompt from the current policy (K >= 2).")
    pairing: str = _f("disjoint", "How K responses form pairs: disjoint ((0,1),(2,3),...; K even) or all (every pair).")
    temperature: float = _f(0.9, "Sampling temperature (> 0).")
    top_p: float = _f(1.0, "Nucleus sampling threshold in (0, 1].")
    max_new_tokens: int = _f(64, "Longest response, in tokens.")
    batch_size: int = _f(0, "Prompts per generation batch (0: all prompts of a step at once).")
    backend: str = _f("shared_prefill", "shared_prefill (prompt prefilled once, KV cache shared by K samples) or hf (transformers generate).")


@dataclass
class AnnotatorConfig:
    type: str = _f("llm", "llm (in-process judge model), openai (any OpenAI-compatible server), reward_model (a sequence-classification model at annotator.model), callable (a Python function) or ensemble.")
    model: str = _f("smollm2-135m-instruct", "Judge model for type=llm (same forms as model.name_or_path).")
    rubric: str = _f("helpful", "A shipped rubric name (helpful, harmless, summarize, helpful_short, helpful_very_short) or a path to a rubric YAML file.")
    callable: str | None = _f(None, "type=callable: 'module:function' of (prompt, a, b) -> P(a better), or of (prompt, response) -> score.")
    both_orders: bool = _f(True, "Ask in both orders and average, cancelling position bias.")
    batch_size: int = _f(8, "Judge prompts per forward pass.")
    max_length: int = _f(1024, "Longest judge prompt in tokens; longer pairs fail with reason 'too_long'.")
    dtype: str = _f("float32", "Judge weights dtype.")
    members: list = _f([], "type=ensemble: member judges, each a mapping of annotator keys, e.g. [{type: llm, rubric: helpful}, {type: callable, callable: 'oaif.annotators.rules:prefer_shorter'}].")
    ensemble_mode: str = _f("mean", "type=ensemble: mean (average probability) or majority (share of members preferring a).")
    base_url: str | None = _f(None, "type=openai: the chat-completions endpoint, e.g. http://127.0.0.1:8000/v1 (vLLM, llama.cpp server, Ollama, OpenAI).")
    api_key_env: str = _f("OPENAI_API_KEY", "type=openai: environment variable holding the API key (never logged).")
    request_timeout: float = _f(30.0, "type=openai: seconds before a request fails as 'timeout'.")
    max_retries: int = _f(2, "type=openai: SDK retries with backoff for connection errors, 429 and 5xx.")
    concurrency: int = _f(8, "type=openai: requests in flight at once.")
    top_logprobs: int = _f(20, "type=openai: alternatives per token to ask for (the preference is read from them).")
    audit_log: bool = _f(True, "Write every judgment to annotations.jsonl in the run directory.")
    max_failure_rate: float = _f(0.5, "Stop (after a checkpoint) when more than this fraction of pairs fail over the window.")
    failure_window: int = _f(64, "Number of most recent pairs over which the failure rate is measured.")


@dataclass
class LossConfig:
    type: str = _f("dpo", "dpo, ipo or slic.")
    beta: float = _f(0.1, "Strength of the pull towards the reference model.")
    soft_labels: bool = _f(False, "Train on the annotator's probability instead of a hard 0/1 label.")
    min_confidence: float = _f(0.0, "Mask pairs whose judged probability is within this distance of 0.5 (ties).")
    missing_eos_penalty: float = _f(0.0, "TRL's missing_eos_penalty for a pairwise judge: subtracted from the Bradley-Terry score of a response that did not end within sampling.max_new_tokens when the other one did, i.e. P(it is better) = sigmoid(logit(p) - penalty); .inf makes it lose. 0 disables.")


@dataclass
class OptimConfig:
    lr: float = _f(1e-6, "Peak learning rate (AdamW).")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    betas: list = _f([0.9, 0.999], "AdamW betas.")
    eps: float = _f(1e-8, "AdamW epsilon.")
    scheduler: str = _f("linear", "constant, linear or cosine (after warmup).")
    warmup_steps: int = _f(0, "Linear warmup steps.")
    max_grad_norm: float = _f(1.0, "Clip gradients to this norm (0 disables).")


@dataclass
class TrainConfig:
    mode: str = _f("online", "online (sample, annotate, update) or offline (data.preference_path).")
    max_steps: int = _f(20, "Optimizer steps.")
    batch_size: int = _f(4, "Prompts per micro-batch per process (offline: pairs).")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.")
    seed: int = _f(42, "Seed for data order, sampling and initialisation.")
    output_dir: str = _f("runs/demo", "Run directory: checkpoints, metrics.jsonl, annotations.jsonl.")
    save_every: int = _f(0, "Save a checkpoint every N steps (0: only at the end).")
    keep_last: int = _f(2, "Keep this many step checkpoints (the final one is always kept).")
    resume: bool | str = _f(False, "true: continue from the latest checkpoint in output_dir; a path: continue from that checkpoint directory; false: start afresh.")
    device: str = _f("auto", "auto, cpu or cuda.")
    mixed_precision: str = _f("no", "Accelerate mixed precision: no, bf16 or fp16.")
    forward_batch_size: int = _f(8, "Sequences per forward pass in the update (0: a micro-batch's sequences in one pass). Passes group sequences of similar length, so each pads to its own longest; a prompt's responses always share a pass. Changes speed and memory, not the result.")


@dataclass
class LoggingConfig:
    report_to: list = _f([], "Extra trackers: tensorboard, wandb.")
    progress_bar: bool = _f(True, "Show a progress bar with live metrics.")
    run_name: str | None = _f(None, "Name for trackers (default: output_dir's name).")


@dataclass
class Config:
    model: ModelConfig = _group(ModelConfig, "Policy model.")
    data: DataConfig = _group(DataConfig, "Prompts and preference data.")
    sampling: SamplingConfig = _group(SamplingConfig, "Response sampling from the policy.")
    annotator: AnnotatorConfig = _group(AnnotatorConfig, "The AI feedback annotator.")
    loss: LossConfig = _group(LossConfig, "Direct alignment loss.")
    optim: OptimConfig = _group(OptimConfig, "Optimizer and schedule.")
    train: TrainConfig = _group(TrainConfig, "Training loop.")
    logging: LoggingConfig = _group(LoggingConfig, "Metrics and trackers.")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_CHOICES = {
    "model.dtype": {"float32", "bfloat16", "float16", "auto"},
    "data.format": {"auto", "jsonl", "csv", "parquet", "hf_disk"},
    "sampling.pairing": {"disjoint", "all"},
    "sampling.backend": {"shared_prefill", "hf"},
    "annotator.type": {"llm", "callable", "openai", "reward_model", "ensemble"},
    "annotator.ensemble_mode": {"mean", "majority"},
    "annotator.dtype": {"float32", "bfloat16", "float16", "auto"},
    "loss.type": {"dpo", "ipo", "slic"},
    "optim.scheduler": {"constant", "linear", "cosine"},
    "train.mode": {"online", "offline"},
    "train.device": {"auto", "cpu", "cuda"},
    "train.mixed_precision": {"no", "bf16", "fp16"},
}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotated type ``tp``; convert only lossless cases (int -> float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is list or origin is list:
        if isinstance(value, list):
            return list(value)
    else:  # pragma: no cover - every field type is one of the above
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _unknown(key: str, known: list[str]) -> ConfigError:
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, known, n=1)
    hint = f" (did you mean '{key.rsplit('.', 1)[0] + '.' if '.' in key else ''}{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def _apply(obj: Any, data: dict, prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in names:
            raise _unknown(key, names)
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            _apply(current, value, key + ".")
        else:
            setattr(obj, name, _coerce(key, value, hints[name]))


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key.sub=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def set_key(cfg: Config, key: str, value: Any) -> None:
    """Set a dotted ``key`` on ``cfg`` with type checking (strings stay strings for str fields)."""
    parts = key.split(".")
    obj: Any = cfg
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(obj)]
        if part not in names:
            raise _unknown(".".join(parts[: i + 1]), names)
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(getattr(obj, part)):
                _apply(getattr(obj, part), value, key + ".")
                return
            tp = typing.get_type_hints(type(obj))[part]
            if isinstance(value, (int, float, bool)) and not isinstance(value, bool) and _accepts_str_only(tp):
                value = str(value)
            setattr(obj, part, _coerce(key, value, tp))
            return
        obj = getattr(obj, part)
        if not dataclasses.is_dataclass(obj):
            raise ConfigError(f"unknown config key '{key}' ('{'.'.join(parts[: i + 1])}' is not a group)")


def _accepts_str_only(tp: Any) -> bool:
    args = typing.get_args(tp) or (tp,)
    return str in args and not ({int, float} & set(args))


def validate(cfg: Config) -> Config:
    """Check the choice fields and value ranges that types alone don't capture."""
    flat = _flatten(cfg.to_dict())
    for key, choices in _CHOICES.items():
        if flat[key] not in choices:
            raise ConfigError(f"{key}: must be one of {', '.join(sorted(choices))}, got {flat[key]!r}")
    checks = [
        ("sampling.num_samples", cfg.sampling.num_samples >= 2, "must be >= 2"),
        ("sampling.num_samples", cfg.sampling.pairing != "disjoint" or cfg.sampling.num_samples % 2 == 0,
         "must be even with sampling.pairing=disjoint"),
        ("sampling.temperature", cfg.sampling.temperature > 0, "must be > 0"),
        ("sampling.top_p", 0 < cfg.sampling.top_p <= 1, "must be in (0, 1]"),
        ("sampling.max_new_tokens", cfg.sampling.max_new_tokens >= 1, "must be >= 1"),
        ("loss.beta", cfg.loss.beta > 0, "must be > 0"),
        ("loss.min_confidence", 0 <= cfg.loss.min_confidence < 0.5, "must be in [0, 0.5)"),
        ("optim.lr", cfg.optim.lr >= 0, "must be >= 0"),
        ("train.max_steps", cfg.train.max_steps >= 1, "must be >= 1"),
        ("train.batch_size", cfg.train.batch_size >= 1, "must be >= 1"),
        ("train.gradient_accumulation_steps", cfg.train.gradient_accumulation_steps >= 1, "must be >= 1"),
        ("train.forward_batch_size", cfg.train.forward_batch_size >= 0, "must be >= 0"),
        ("data.eval_fraction", 0 <= cfg.data.eval_fraction < 1, "must be in [0, 1)"),
        ("annotator.members", cfg.annotator.type != "ensemble" or len(cfg.annotator.members) >= 1,
         "annotator.type=ensemble needs at least one member"),
        ("annotator.base_url", cfg.annotator.type != "openai" or cfg.annotator.base_url,
         "annotator.type=openai needs annotator.base_url"),
        ("annotator.request_timeout", cfg.annotator.request_timeout > 0, "must be > 0"),
        ("annotator.max_retries", cfg.annotator.max_retries >= 0, "must be >= 0"),
        ("annotator.concurrency", cfg.annotator.concurrency >= 1, "must be >= 1"),
        ("annotator.top_logprobs", 1 <= cfg.annotator.top_logprobs <= 20, "must be in [1, 20]"),
        ("annotator.max_failure_rate", 0 < cfg.annotator.max_failure_rate <= 1, "must be in (0, 1]"),
        ("train.mode", cfg.train.mode != "offline" or cfg.data.preference_path,
         "offline mode needs data.preference_path"),
        ("annotator.callable", cfg.annotator.type != "callable" or cfg.annotator.callable,
         "annotator.type=callable needs annotator.callable='module:function'"),
        ("annotator.failure_window", cfg.annotator.failure_window >= 1, "must be >= 1"),
        ("loss.missing_eos_penalty", cfg.loss.missing_eos_penalty >= 0, "must be >= 0 (.inf: an unfinished response loses)"),
        ("model.lora.dropout", not (cfg.model.lora.enabled and cfg.model.disable_dropout and cfg.model.lora.dropout > 0),
         "has no effect with model.disable_dropout=true (set model.disable_dropout=false to use it)"),
        ("train.resume", not isinstance(cfg.train.resume, str) or bool(cfg.train.resume.strip()),
         "must be true, false or a checkpoint directory"),
    ]
    for key, ok, msg in checks:
        if not ok:
            raise ConfigError(f"{key}: {msg}")
    for tracker in cfg.logging.report_to:
        if tracker not in ("tensorboard", "wandb"):
            raise ConfigError(f"logging.report_to: unknown tracker {tracker!r} (tensorboard, wandb)")
    return cfg


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _read_yaml(path: str | Path, what: str = "config") -> Any:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} file not found: {p}")
    try:
        return yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a :class:`Config` from an optional YAML file and ``key.sub=value`` overrides."""
    cfg = Config()
    if path is not None:
        _apply(cfg, _read_yaml(path))
    for item in overrides:
        key, value = _parse_override(item)
        set_key(cfg, key, value)
    return validate(cfg)


def describe() -> str:
    """Every key with its type, default and help, one per line."""
    lines = []

    def walk(obj: Any, prefix: str) -> None:
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                lines.append(f"{prefix}{f.name}:  # {f.metadata.get('help', '')}")
                walk(value, prefix + f.name + ".")
            else:
                tp = _type_name(hints[f.name]) if not typing.get_args(hints[f.name]) else str(hints[f.name])
                lines.append(f"  {prefix}{f.name} = {value!r}  ({tp})  {f.metadata.get('help', '')}")

    walk(Config(), "")
    return "\n".join(lines)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def load_annotator_config(path: str | Path | None = None, sets: list[str] | tuple[str, ...] = ()) -> AnnotatorConfig:
    """An :class:`AnnotatorConfig` from an optional YAML file and ``key=value`` items.

    The file's ``annotator:`` group (a training config, a run's ``config.yaml``) or its top level
    holds annotator keys. Keys in ``sets`` may carry the ``annotator.`` prefix or not. Errors are
    the same one-line :class:`ConfigError` s as for a training config.
    """
    cfg = Config()
    if path is not None:
        data = _read_yaml(path, "annotator config")
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of annotator keys, got {type(data).__name__}")
        group = data["annotator"] if "annotator" in data else data
        if not isinstance(group, dict):
            raise ConfigError(f"{path}: 'annotator' must be a mapping, got {group!r}")
        set_key(cfg, "annotator", group)
    for item in sets:
        if "=" not in item:
            raise ConfigError(f"--set '{item}' is not of the form key=value")
        key, value = _parse_override(item)
        key = key[len("annotator."):] if key.startswith("annotator.") else key
        if not key:
            raise ConfigError(f"--set '{item}' has no key")
        set_key(cfg, f"annotator.{key}", value)
    return validate(cfg).annotator
