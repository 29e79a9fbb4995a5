"""The loaded models as torch modules: the model inside the wrappers, dropout off, gradient
checkpointing, the KV-cache argument name, and the reference context.

The reference for the KL-anchored losses is a frozen copy of the starting policy (full fine-tuning)
or, with LoRA, the policy itself with its adapter disabled, or (a LoRA reference that moves, see
:mod:`oaif.models.reference`) with a :class:`ReferenceAdapter`'s weights in place of its adapter's.
:func:`reference_context` hides the difference, so callers write the same code in every case::

    with reference_context(policy, reference) as ref_model:
        ref_logits = ref_model(input_ids, attention_mask=mask).logits
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any

from oaif.errors import ModelError

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


def _unwrap(model):
    """The model inside DDP/accelerate wrappers (anything with ``.module``)."""
    while hasattr(model, "module") and not is_peft(model):
        inner = model.module
        if inner is model:
            break
        model = inner
    return model


def without_ddp(model):
    """The module inside DDP/accelerate wrappers, a peft model kept (its adapter is part of the policy).

    It is the module ``accelerator.prepare`` patched, so its forward still runs under the run's
    autocast (``train.mixed_precision``); calling it runs none of DDP's forward (no buffer broadcast,
    no gradient-reducer hooks), so processes may call it different numbers of times.
    """
    return _unwrap(model)


def is_peft(model) -> bool:
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
    return inner.get_base_model() if is_peft(inner) else inner


@functools.lru_cache(maxsize=1)
def kv_cache_key() -> str:
    """The name under which the installed transformers passes and returns a KV cache: ``cache`` (5.x;
    ``past_key_values`` is deprecated there) or ``past_key_values`` (older versions)."""
    import dataclasses

    from transformers.modeling_outputs import CausalLMOutputWithPast

    names = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
    return "cache" if "cache" in names else "past_key_values"


@dataclass
class ReferenceAdapter:
    """A LoRA reference that moves (TR-DPO): the frozen base with these adapter weights.

    ``tensors`` maps the names of the policy's trainable (adapter) parameters to the reference's
    values: one copy of the adapter, not of the model. :func:`reference_context` swaps them into
    the policy's adapter for the reference's forward (the storage is exchanged, nothing is copied)
    and back afterwards.
    """

    tensors: dict[str, Any]

    @classmethod
    def copy_of(cls, policy) -> "ReferenceAdapter":
        """The policy's adapter as it is now (at setup, the starting policy's)."""
        inner = _unwrap(policy)
        return cls({name: p.detach().clone() for name, p in inner.named_parameters() if p.requires_grad})


def _swap_adapter(inner, adapter: ReferenceAdapter) -> None:
    """Exchange the storage of the policy's adapter parameters with ``adapter``'s tensors (a second call undoes it)."""
    params = dict(inner.named_parameters())
    for name, tensor in adapter.tensors.items():
        p = params[name]
        adapter.tensors[name], p.data = p.data, tensor


@contextlib.contextmanager
def reference_context(policy, reference=None):
    """Yield the model that computes reference log-probs, under ``torch.no_grad()``.

    With a separate ``reference`` model, that model. With ``reference=None`` and a LoRA (peft)
    policy, the policy with its adapter disabled; with a :class:`ReferenceAdapter`, the policy with
    that adapter's weights in place of its own; both in eval mode for the duration of the block.
    The policy's adapter weights and train/eval mode are restored on exit.
    """
    import torch

    if reference is not None and not isinstance(reference, ReferenceAdapter):
        with torch.no_grad():
            yield reference
        return
    inner = _unwrap(policy)
    if not is_peft(inner):
        raise ValueError("reference_context: no reference model and the policy has no LoRA adapter to disable")
    was_training = inner.training
    inner.eval()
    try:
        if reference is None:
            with torch.no_grad(), inner.disable_adapter():
                yield inner
        else:
            with torch.no_grad():
                _swap_adapter(inner, reference)
                try:
                    yield inner
                finally:
                    _swap_adapter(inner, reference)
    finally:
        inner.train(was_training)
