"""Typed run configuration: grouped dataclasses, loaded from YAML, with ``key.sub=value`` overrides.

Every field carries its help text in ``metadata["help"]``; ``oaif config --help-fields`` prints it.
Loading is strict: an unknown key, a value of the wrong type, or a missing file is a
:class:`ConfigError` whose one-line message names the offending key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
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
    dtype: str = _f("float32", "Weights dtype: float32, bfloat16, float16 (LoRA only: full fine-tuning in float16 "
                               "underflows AdamW) or auto.")
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
    backend: str = _f("shared_prefill", "shared_prefill (prompt prefilled once, KV cache shared by K samples), hf (transformers generate) or vllm (a vLLM engine or server, see the vllm group; sampling.batch_size does not apply).")


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
    request_timeout: float = _f(30.0, "type=openai: deadline in seconds for one judge request (one order of one pair) from "
                                      "first connect to last byte, retries and their backoff included; past it the "
                                      "request fails as 'timeout'. A server that trickles bytes is cut at the deadline.")
    max_retries: int = _f(2, "type=openai: retries of a request after a connection error, HTTP 408/409/429 or 5xx, with "
                             "backoff (0.5 s doubling to 8 s, or the server's Retry-After); only while the deadline allows.")
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
    keep_last: int = _f(2, "Keep this many step checkpoints (the final one is always kept; 0 keeps all).")
    resume: bool | str = _f(False, "true: continue from the latest checkpoint in output_dir; a path: continue from that checkpoint directory; false: start afresh.")
    overwrite_output_dir: bool = _f(False, "A fresh run (resume=false) in an output_dir that holds an earlier run: "
                                           "delete its checkpoints, latest, metrics, audit log and config.yaml first "
                                           "(false: refuse to start).")
    resume_allow_changes: list = _f([], "Keys a resume may change although they make another experiment (e.g. "
                                        "[optim.lr]); max_steps, save_every, keep_last, output_dir, logging.* and "
                                        "the annotator server's URL, timeout, retries and concurrency may always change.")
    device: str = _f("auto", "auto, cpu or cuda.")
    mixed_precision: str = _f("no", "Accelerate mixed precision: no, bf16 or fp16 (fp16 needs a GPU).")
    forward_batch_size: int = _f(8, "Sequences per forward pass in the update (0: a micro-batch's sequences in one pass). Passes group sequences of similar length, so each pads to its own longest; a prompt's responses always share a pass. Changes speed and memory, not the result.")
    share_prompt_forward: bool = _f(True, "Forward each prompt once for all its responses in the update (they continue its KV cache), policy and reference alike; false forwards one [prompt | response] row per response, as oaif did before. The same result up to float rounding. Off by itself where the policy takes no KV cache in training (gradient checkpointing).")


@dataclass
class LoggingConfig:
    report_to: list = _f([], "Extra trackers: tensorboard, wandb.")
    progress_bar: bool = _f(True, "Show a progress bar with live metrics.")
    run_name: str | None = _f(None, "Name for trackers (default: output_dir's name).")


@dataclass
class VllmConfig:
    mode: str = _f("colocated", "colocated (a vLLM engine inside each training process; weights copied in place after "
                                "every optimizer step) or server (an OpenAI-compatible vLLM server at vllm.server_url; it "
                                "reloads the weights from vllm.weights_dir).")
    server_url: str = _f("http://127.0.0.1:8000", "Server mode: base URL of the vLLM server (started with "
                                                  "VLLM_SERVER_DEV_MODE=1 so it accepts weight reloads).")
    server_model: str | None = _f(None, "Server mode: the served model name to request (default: the first the server lists).")
    weights_dir: str | None = _f(None, "Server mode: directory the new weights are written to for the server to reload "
                                       "(it must see the same file system; default: <train.output_dir>/vllm_weights).")
    request_timeout_s: float = _f(600.0, "Server mode: seconds to wait for one completion or weight reload.")
    max_concurrency: int = _f(64, "Server mode: completion requests in flight at once (one per sampled response).")
    kv_cache_gib: float = _f(1.0, "Colocated: memory for the engine's KV cache, in GiB (CPU RAM on CPU; preempted "
                                  "requests are recomputed if it is too small).")
    max_model_len: int = _f(0, "Colocated: longest prompt + response the engine accepts "
                               "(0: data.max_prompt_tokens + sampling.max_new_tokens).")
    max_num_seqs: int = _f(64, "Colocated: most sequences decoded together.")
    dtype: str = _f("auto", "Colocated: engine weights dtype (auto: the dtype the policy computes in, bfloat16 under train.mixed_precision=bf16, else its weights' dtype; float32, bfloat16, float16).")
    enforce_eager: bool = _f(True, "Colocated: run the model eagerly (no torch.compile; starts in seconds, the "
                                   "compile cache is not reused between runs).")

    def validate(self) -> None:
        """Check the values (also for a group built in code, e.g. ``VllmConfig(mode="server")``)."""
        if self.mode not in ("colocated", "server"):
            raise ConfigError(f"vllm.mode: expected colocated or server, got {self.mode!r}")
        if self.kv_cache_gib <= 0:
            raise ConfigError(f"vllm.kv_cache_gib: must be > 0, got {self.kv_cache_gib}")
        if self.max_model_len < 0:
            raise ConfigError(f"vllm.max_model_len: must be >= 0, got {self.max_model_len}")
        if self.max_num_seqs < 1 or self.max_concurrency < 1:
            raise ConfigError("vllm.max_num_seqs and vllm.max_concurrency: must be >= 1")
        if self.request_timeout_s <= 0:
            raise ConfigError(f"vllm.request_timeout_s: must be > 0, got {self.request_timeout_s}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"vllm.dtype: expected auto, float32, bfloat16 or float16, got {self.dtype!r}")


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
    vllm: VllmConfig = _group(VllmConfig, "The vLLM sampling backend (sampling.backend=vllm; needs vLLM installed).")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_CHOICES = {
    "model.dtype": {"float32", "bfloat16", "float16", "auto"},
    "data.format": {"auto", "jsonl", "csv", "parquet", "hf_disk"},
    "sampling.pairing": {"disjoint", "all"},
    "sampling.backend": {"shared_prefill", "hf", "vllm"},
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
    if isinstance(value, str) and not value.isascii():  # a lone UTF-16 surrogate ("\ud800" in YAML, or bytes
        try:                                            # that are not UTF-8 on the command line) is not text
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigError(f"{key}: not text (a lone UTF-16 surrogate, or bytes that are not UTF-8)") from None
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
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {_short(value)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _WORD_BOOLS:
            return _WORD_BOOLS[value.lower()]
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
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_short(value)}")


def _unknown(key: str, known: list[str]) -> ConfigError:
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, known, n=1)
    hint = f" (did you mean '{key.rsplit('.', 1)[0] + '.' if '.' in key else ''}{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def _apply(obj: Any, data: dict, prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {_short(data)}")
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


class _Loader(yaml.SafeLoader):
    """YAML with 1.2's booleans: only true/false. YAML 1.1 reads no/off/yes/on as booleans, which
    would turn the documented ``train.mixed_precision=no`` into False; here they stay strings (and
    bool keys accept them, :func:`_coerce`)."""


_BOOL_TAG = "tag:yaml.org,2002:bool"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_WORD_BOOLS = {"yes": True, "on": True, "no": False, "off": False}


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key.sub=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = _yaml(raw) if raw.strip() else ""
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
        ("sampling.temperature", cfg.sampling.temperature > 0, "must be > 0"),
        ("sampling.top_p", 0 < cfg.sampling.top_p <= 1, "must be in (0, 1]"),
        ("sampling.max_new_tokens", cfg.sampling.max_new_tokens >= 1, "must be >= 1"),
        ("sampling.batch_size", cfg.sampling.batch_size >= 0, "must be >= 0 (0: all prompts of a step at once)"),
        ("loss.beta", cfg.loss.beta > 0, "must be > 0"),
        ("loss.min_confidence", 0 <= cfg.loss.min_confidence < 0.5, "must be in [0, 0.5)"),
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
            raise ConfigError(f"train.resume_allow_changes: {_short(key)} is not a config key (see `oaif config keys`)")
    cfg.vllm.validate()
    for tracker in cfg.logging.report_to:
        if tracker not in ("tensorboard", "wandb"):
            raise ConfigError(f"logging.report_to: unknown tracker {tracker!r} (tensorboard, wandb)")
    _validate_annotator(cfg.annotator, "annotator.")
    return cfg


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
        (k + "rubric", a.type not in ("llm", "openai") or a.rubric.strip(), "must name a rubric"),
        (k + "members", a.type != "ensemble" or len(a.members) >= 1,
         "annotator.type=ensemble needs at least one member"),
        (k + "base_url", a.type != "openai" or a.base_url, "annotator.type=openai needs annotator.base_url"),
        (k + "base_url", a.type != "openai" or re.match(r"https?://[^\s/]+", a.base_url.strip()),
         f"must be an http:// or https:// URL, got {_short(a.base_url)}"),
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
    ])
    for i, spec in enumerate(a.members):
        where = f"{prefix}members[{i}]"
        if not isinstance(spec, dict) or spec.get("type") == "ensemble":
            raise ConfigError(f"{where}: expected a mapping of annotator keys (not an ensemble), got {_short(spec)}")
        member = dataclasses.replace(a, members=[])
        _apply(member, spec, where + ".")
        _check_finite(member, where + ".")
        for key in ("type", "ensemble_mode", "dtype"):
            choices = _CHOICES[f"annotator.{key}"]
            if getattr(member, key) not in choices:
                raise ConfigError(f"{where}.{key}: must be one of {', '.join(sorted(choices))}, got {getattr(member, key)!r}")
        _validate_annotator(member, where + ".")


def flatten(d: dict, prefix: str = "") -> dict:
    """A nested config dict as ``{"group.key": value}`` (the names ``key=value`` overrides use)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _read_yaml(path: str | Path, what: str = "config") -> Any:
    """The parsed YAML of a file; a missing, unreadable, binary or non-UTF-8 file is a one-line ConfigError."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{what} file {p} is a directory")
    if not p.is_file():
        raise ConfigError(f"{what} file not found: {p}")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{what} file {p}: cannot read it ({e.strerror or e})") from None
    if b"\0" in raw:
        raise ConfigError(f"{what} file {p}: binary data, not YAML text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} file {p}: not UTF-8 text (byte {e.start})") from None
    try:
        duplicate = _duplicate_key(yaml.compose(text, Loader=_Loader))
        data = _yaml(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if duplicate:
        raise ConfigError(f"{p}: {duplicate}")
    return {} if data is None else data


def _duplicate_key(node: Any) -> str | None:
    """'key 'x' appears twice (line N)' for the first mapping key given twice (YAML would keep the last)."""
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else None
            if name is not None and name in seen:
                return f"key '{name}' appears twice (line {key.start_mark.line + 1}); YAML would silently keep the last"
            seen.add(name)
            found = _duplicate_key(value)
            if found:
                return found
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            found = _duplicate_key(item)
            if found:
                return found
    return None


def _expect_mapping(data: Any, p: str | Path, what: str) -> dict:
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of {what}, got {type(data).__name__} ({_short(data)})")
    return data


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a :class:`Config` from an optional YAML file and ``key.sub=value`` overrides."""
    cfg = Config()
    if path is not None:
        _apply(cfg, _expect_mapping(_read_yaml(path), path, "config groups (model:, train:, ...)"))
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
        data = _expect_mapping(_read_yaml(path, "annotator config"), path, "annotator keys")
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
