"""The policy's weights as (transformers name, tensor) pairs: what a generation engine is given after
each step, and what a LoRA run's checkpoint saves (:mod:`oaif.run.checkpoint`), so both are the same.

A full model gives its own tensors (no copy). A peft LoRA model gives the base weights with each
adapter's delta added *out of place* (``W + B @ A * scaling`` as a new tensor, summed in float32
and rounded once to ``W``'s dtype), under the base model's names (``.base_layer.`` removed,
adapter tensors left out). The live model is never merged and unmerged, so its frozen base (which
is also the reference) stays bit-identical; in bfloat16 ``(W + delta) - delta`` is not ``W``.
Tied output embeddings are left out, as ``save_pretrained`` does, except under a LoRA adapter on
the input or output embedding (:func:`untied_lora`): the live peft model adds the embedding's delta
to its inputs only and the output head's delta to its logits only, so the merged model is untied.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator

import torch

from oaif.generation.base import GenerationError

WEIGHTS_FILE = "model.safetensors"


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _tied(model) -> bool:
    return bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))


def untied_lora(model) -> bool:
    """Whether ``model`` is a peft model over tied embeddings with an adapter on the input or the output
    embedding. Its two sides then differ (each has its own delta, or only one has one), so its merged
    weights hold both, and a checkpoint of it is saved as an untied model (``tie_word_embeddings=false``)."""
    if not _is_peft(model):
        return False
    base = model.get_base_model()
    if not _tied(base):
        return False
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in (base.get_input_embeddings(), base.get_output_embeddings()))


def _lora_delta(module, key: str) -> torch.Tensor | None:
    """The sum of the active adapters' deltas of one LoRA layer, in float32 (None when nothing is to add)."""
    if getattr(module, "merged", False) or getattr(module, "disable_adapters", False):
        return None  # merged: the delta is already in the base weight; disabled: the base is the model
    delta = None
    for name in module.active_adapters:
        if name not in getattr(module, "lora_A", {}) and name not in getattr(module, "lora_embedding_A", {}):
            continue  # not an adapter of this layer (an embedding keeps its adapters in lora_embedding_A/B)
        if getattr(module, "use_dora", {}).get(name, False):
            raise GenerationError(f"{key}: DoRA adapters cannot be merged out of place yet")
        d = module.get_delta_weight(name).float()
        delta = d if delta is None else delta + d
    return delta


def _lora_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    base = model.get_base_model()
    modules = dict(base.named_modules())
    tied = _tied(base) and not untied_lora(model)
    for key, value in base.state_dict().items():
        if "lora_" in key:
            continue
        if "modules_to_save" in key or "original_module" in key:
            raise GenerationError(f"{key}: peft modules_to_save cannot be merged into the base model's weights")
        name = key.replace(".base_layer.", ".")
        if tied and name.endswith("lm_head.weight"):
            continue
        if key.endswith(".base_layer.weight"):
            delta = _lora_delta(modules[key[: -len(".base_layer.weight")]], key)
            if delta is not None:
                value = (value.float() + delta).to(value.dtype)
        yield name, value.detach()


def policy_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """Every weight of the (unwrapped) policy under transformers names; LoRA merged out of place."""
    with torch.no_grad():
        if _is_peft(model):
            yield from _lora_weights(model)
            return
        tied = _tied(model)
        for key, value in model.state_dict().items():
            if tied and key.endswith("lm_head.weight"):
                continue
            yield key, value.detach()


def save_weights(weights: Iterable[tuple[str, torch.Tensor]], directory: str | os.PathLike) -> Path:
    """Write the weights as ``<directory>/model.safetensors`` (atomically: a reader never sees half a file)."""
    from safetensors.torch import save_file

    out = Path(directory)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in weights}
    if not tensors:
        raise GenerationError("no weights to save")
    tmp = out / f".{WEIGHTS_FILE}.{os.getpid()}.tmp"
    try:
        out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, out / WEIGHTS_FILE)
    except OSError as e:
        raise GenerationError(f"cannot write the policy's weights to {out} (vllm.weights_dir): {e}") from e
    return out / WEIGHTS_FILE
