"""Loading: the config, the tokenizer, a causal LM, and the policy with its reference.

Everything loads from local files only (a hub id from the local Hugging Face cache; oaif never
downloads), and every failure is a :class:`~oaif.errors.ModelError` whose one-line message names
the model.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

from oaif.errors import ModelError
from oaif.errors import one_line as _one_line
from oaif.models.modules import _enable_gradient_checkpointing, disable_dropout
from oaif.models.resolve import looks_like_hub_id, resolve_model_path


def _hub_note(name: str, resolved: str) -> str:
    if resolved == name and looks_like_hub_id(name):
        return (" (a Hugging Face id is loaded from the local cache only; oaif never downloads: "
                f"fetch it first with `huggingface-cli download {name}`)")
    return ""


def _torch_dtype(dtype: Any) -> Any:
    import torch

    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ModelError(f"unknown dtype {dtype!r} (float32, bfloat16, float16 or auto)")
    return table[dtype]


def load_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "this model's files cannot be loaded": missing, corrupt, truncated or foreign files."""
    errors: list[type[BaseException]] = [OSError, ValueError, KeyError, ImportError, RuntimeError, EOFError]
    try:
        from safetensors import SafetensorError

        errors.append(SafetensorError)
    except ImportError:  # pragma: no cover - safetensors ships with transformers
        pass
    return tuple(errors)


def describe_load_error(e: BaseException) -> str:
    """One line for a load error; a safetensors error says the weights file is corrupt or truncated."""
    if type(e).__name__ == "SafetensorError":
        return f"a .safetensors weights file is corrupt or truncated ({_one_line(e)})"
    return _one_line(e)


def load_model_config(name_or_path: str, cache_dir: str | None = None, trust_remote_code: bool = False):
    """``(resolved path, transformers config)`` of a model, with load errors as one-line ModelErrors."""
    from transformers import AutoConfig

    path = resolve_model_path(name_or_path, cache_dir)
    try:
        return path, AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, ImportError) as e:
        raise ModelError(f"cannot load model {name_or_path}: {_one_line(e)}{_hub_note(str(name_or_path), path)}") from e


def load_tokenizer(name_or_path: str, cache_dir: str | None = None, trust_remote_code: bool = False):
    """The model's tokenizer with a pad token (EOS when it has none) and left padding."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path, cache_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, ImportError) as e:
        raise ModelError(f"cannot load the tokenizer of {name_or_path}: {_one_line(e)}"
                         f"{_hub_note(str(name_or_path), path)}") from e
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or getattr(tokenizer, "unk_token", None)
        if fallback is None:
            raise ModelError(f"the tokenizer of {name_or_path} has neither a pad nor an EOS token")
        tokenizer.pad_token = fallback
    tokenizer.padding_side = "left"
    return tokenizer


def load_causal_lm(name_or_path: str, dtype: Any = "float32", cache_dir: str | None = None,
                   trust_remote_code: bool = False):
    """Load ``(model, tokenizer)`` on the CPU, in eval mode, without network access."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(name_or_path, cache_dir)
    torch_dtype = _torch_dtype(dtype)
    tokenizer = load_tokenizer(path, cache_dir, trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, local_files_only=True,
                                                     trust_remote_code=trust_remote_code)
    except load_errors() as e:
        raise ModelError(f"cannot load model {name_or_path}: {describe_load_error(e)}"
                         f"{_hub_note(str(name_or_path), path)}") from e
    model.eval()
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        if gen.pad_token_id is None:
            gen.pad_token_id = tokenizer.pad_token_id
        if gen.eos_token_id is None and tokenizer.eos_token_id is not None:
            gen.eos_token_id = tokenizer.eos_token_id
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_policy_and_reference(cfg, reference_copy: bool = True):
    """``(policy, reference, tokenizer)`` for a :class:`~oaif.config.ModelConfig`.

    Full fine-tuning: ``reference`` is a frozen (no grad, eval mode) deep copy of the starting
    policy, or None without ``reference_copy`` (``loss.reference=behavior`` needs none). LoRA (``cfg.lora.enabled``): ``policy`` is a peft model and ``reference`` is ``None``;
    the reference is the policy with its adapter disabled (see
    :func:`~oaif.models.modules.reference_context`). The policy is returned in train mode, with
    gradient checkpointing if configured, and with every dropout off in both models when
    ``cfg.disable_dropout`` (see :func:`~oaif.models.modules.disable_dropout`).
    """
    policy, tokenizer = load_causal_lm(cfg.name_or_path, cfg.dtype, cfg.cache_dir, cfg.trust_remote_code)
    if cfg.disable_dropout:
        disable_dropout(policy)
    if cfg.lora.enabled:
        try:
            from peft import LoraConfig as PeftLoraConfig
            from peft import get_peft_model
        except ImportError as e:
            raise ModelError("model.lora.enabled needs the peft package: pip install 'oaif[lora]'") from e
        lora = cfg.lora
        peft_config = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                     target_modules=list(lora.target_modules), bias="none", task_type="CAUSAL_LM")
        if cfg.gradient_checkpointing:
            _enable_gradient_checkpointing(policy)
        try:
            with warnings.catch_warnings():  # peft still reads the deprecated transformers property
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                policy = get_peft_model(policy, peft_config)
        except ValueError as e:
            raise ModelError(f"cannot add LoRA adapters to {cfg.name_or_path} "
                             f"(model.lora.target_modules={list(lora.target_modules)}): {_one_line(e)}") from e
        reference = None
        if cfg.disable_dropout:
            disable_dropout(policy)  # the adapter's own dropout too
    else:
        if str(getattr(policy, "dtype", "")) == "torch.float16":  # model.dtype=auto on a float16 checkpoint
            raise ModelError(f"model.dtype={cfg.dtype} loads {cfg.name_or_path} in float16, which full fine-tuning "
                             f"refuses (AdamW's eps and small squared gradients underflow to 0): set "
                             f"model.dtype=bfloat16 or float32, or model.lora.enabled=true")
        reference = copy.deepcopy(policy) if reference_copy else None
        if reference is not None:
            reference.requires_grad_(False)
            reference.eval()
        if cfg.gradient_checkpointing:
            _enable_gradient_checkpointing(policy)
    policy.train()
    return policy, reference, tokenizer
