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

A model sharded with FSDP2 (``train.fsdp``) gives each weight gathered whole (its float32 master
value) one tensor at a time, as it is asked for, and a LoRA layer's base weight with that layer's
adapters only: a push or a checkpoint never holds the whole model at once beyond the shards. Each
gather is a collective, so every process iterates the weights to the end in the same order
(:class:`GatheredWeights`), while only the main process uses them.

Names: :func:`policy_weights` gives the names a checkpoint file holds, which vLLM's loaders read.
transformers 5 loads some models under other names (a mixture of experts fuses each layer's
experts into one tensor) and saves them back under the checkpoint's: :func:`checkpoint_names` and
:func:`runtime_names` apply its weight conversion mapping in either direction (a resume needs the latter).
"""

from __future__ import annotations

import collections
import os
from pathlib import Path
from typing import Iterable, Iterator

import torch

from oaif.generation.base import GenerationError
from oaif.models.modules import is_peft
from oaif.models.sharding import full_parameters

WEIGHTS_FILE = "model.safetensors"



def _tied(model) -> bool:
    return bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))


def untied_lora(model) -> bool:
    """Whether ``model`` is a peft model over tied embeddings with an adapter on the input or the output
    embedding. Its two sides then differ (each has its own delta, or only one has one), so its merged
    weights hold both, and a checkpoint of it is saved as an untied model (``tie_word_embeddings=false``)."""
    if not is_peft(model):
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


def _merged(module, key: str, value: torch.Tensor) -> torch.Tensor:
    """A LoRA layer's base weight with its adapters' delta added (sharded: the layer's own tensors gathered
    whole while it is computed, and only those)."""
    if _is_sharded(value):
        with full_parameters(module):
            return _merged(module, key, module.base_layer.weight.detach())
    delta = _lora_delta(module, key)
    return value if delta is None else (value.float() + delta).to(value.dtype)


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
            yield name, _merged(modules[key[: -len(".base_layer.weight")]], key, value).detach()
        else:
            yield name, _full(value).detach()


def merged_state_dict(model) -> Iterator[tuple[str, torch.Tensor]]:
    """Every weight of the (unwrapped) policy under its ``state_dict`` names; LoRA merged out of place;
    sharded weights gathered one at a time (a collective per weight)."""
    with torch.no_grad():
        if is_peft(model):
            yield from _lora_weights(model)
            return
        tied = _tied(model)
        for key, value in model.state_dict().items():
            if tied and key.endswith("lm_head.weight"):
                continue
            yield key, _full(value).detach()


def _is_sharded(value) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def _full(value: torch.Tensor) -> torch.Tensor:
    """A weight as a plain tensor: a sharded one gathered whole (a collective), any other as it is."""
    return value.full_tensor() if _is_sharded(value) else value


class GatheredWeights:
    """The weights of a sharded policy, gathered one at a time while they are iterated: every process must
    iterate them to the end (:func:`take_part`), in the same order, whether it uses them or not."""

    def __init__(self, weights: Iterator[tuple[str, torch.Tensor]]):
        self._weights = weights

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        return self._weights


def take_part(weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Run the rest of the gathers of :class:`GatheredWeights` (dropping each tensor): what a process does that
    does not send them, or one whose send stopped part way. Nothing for other weights (they run no collective)."""
    if isinstance(weights, GatheredWeights):
        collections.deque(weights, maxlen=0)  # holds none: each tensor is dropped before the next gather


def policy_weights(model) -> Iterable[tuple[str, torch.Tensor]]:
    """Every weight of the (unwrapped) policy under the names its checkpoint files hold (what vLLM loads);
    LoRA merged out of place. These are the ``state_dict`` names except where transformers converts
    weights on loading (:func:`checkpoint_names`). A sharded policy's weights come as :class:`GatheredWeights`."""
    from oaif.models.sharding import is_sharded

    weights = _policy_weights(model)
    return GatheredWeights(weights) if is_sharded(model) else weights


def _policy_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    base = model.get_base_model() if is_peft(model) else model
    if not _conversions(base):
        yield from merged_state_dict(model)
        return
    with torch.no_grad():  # converted together: sharded, every weight is gathered before the first is given
        yield from checkpoint_names(base, dict(merged_state_dict(model))).items()


def _conversions(model) -> list:
    """The weight conversions transformers (5+) applies between a checkpoint's names and ``model``'s: e.g. a
    mixture of experts' per-expert tensors, fused into one tensor per layer on loading. [] for most models."""
    convs = getattr(model, "_weight_conversions", None)  # set by from_pretrained: the conversions it used
    if convs is None:
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import PrefixChange
        except ImportError:  # transformers 4: weights are loaded under their own names
            return []
        convs = [c for c in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(c, PrefixChange)]
    return list(convs)


def checkpoint_names(model, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``weights`` under ``model``'s ``state_dict`` names, converted to its checkpoint's names, as
    ``save_pretrained`` does (transformers' reverse weight conversion)."""
    if not _conversions(model):
        return weights
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, weights)


def runtime_names(model, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``weights`` under ``model``'s checkpoint names, converted to its ``state_dict`` names, as
    ``from_pretrained`` does (transformers' weight conversion mapping; the inverse of :func:`checkpoint_names`)."""
    convs = _conversions(model)
    if not convs:
        return weights
    import copy

    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    renamings = [c for c in convs if isinstance(c, WeightRenaming)]
    converters = [c for c in convs if isinstance(c, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    out, pending = {}, {}
    for key in sorted(weights, key=dot_natural_key):  # experts in index order: they are stacked as collected
        name, pattern = rename_source_key(key, renamings, converters)
        if pattern is None:
            out[name] = weights[key]
        else:
            pending.setdefault(name, copy.deepcopy(by_pattern[pattern])).add_tensor(name, key, pattern, weights[key])
    for name, converter in pending.items():
        for target, value in converter.convert(name, model=model, config=model.config).items():
            out[target] = value[0] if isinstance(value, list) else value
    return out


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
