"""GGUF conversion: a ``.gguf`` file becomes a plain safetensors model directory, once.

The file is dequantized by transformers and saved in the cache (``cache_dir``, else
``$OAIF_CACHE``, else ``~/.cache/oaif``), under ``models/<stem>-<hash of size and mtime>``. The
directory appears atomically (written to a temporary directory, then renamed), so an interrupted
conversion never leaves a half model, and two processes converting at once are safe (one waits on
a lock, or the loser of the rename discards its copy).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

from oaif.errors import ModelError
from oaif.errors import one_line as _one_line

log = logging.getLogger("oaif.models")

# Bump when the conversion output changes, so caches made by older code are not reused.
_CONVERTER_VERSION = 1
_MARKER = "oaif_conversion.json"
_STALE_TMP_S = 3600.0

# Number of GGUF conversions this process has performed (observable in tests).
conversion_count = 0


def default_cache_dir() -> str:
    """``$OAIF_CACHE`` if set, else ``~/.cache/oaif``."""
    return os.path.expanduser(os.environ.get("OAIF_CACHE") or os.path.join("~", ".cache", "oaif"))


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
