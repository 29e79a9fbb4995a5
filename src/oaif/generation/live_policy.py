"""The transformers backends (``shared_prefill``, ``hf``) behind the :class:`~oaif.generation.base.Generator` interface.

:class:`LivePolicy` samples the training policy itself, so the trainer calls every backend the same
way: a weight push after an optimizer step has nothing to do there (the policy already holds them).
:class:`PolicyCopy` (``train.async_steps`` >= 1) samples a copy of the policy without gradients,
which a push overwrites, so a background worker can sample while the step updates the policy: it
costs one more copy of the weights, in the policy's dtype, on its device.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from typing import Callable, Iterable

import torch

from oaif.generation.base import GenerationError
from oaif.step.sampling import sample_responses


class LivePolicy:
    """Samples ``model`` (the unwrapped policy) with :func:`oaif.step.sampling.sample_responses`.

    ``autocast`` (the run's mixed-precision context, e.g. ``accelerator.autocast``) wraps the whole
    decode in one region, so its cast cache converts each weight once per call, not once per token."""

    def __init__(self, model, tokenizer, backend: str = "shared_prefill", batch_size: int = 0,
                 autocast: Callable = nullcontext):
        self.model, self.tokenizer, self.backend, self.batch_size = model, tokenizer, backend, batch_size
        self.autocast = autocast

    def sample(self, prompt_tokens: list[list[int]], positions: list[int], *, k: int, seed: int,
               temperature: float, top_p: float, max_new_tokens: int, logprobs: bool = False):
        with self.autocast():
            return sample_responses(self.model, self.tokenizer, prompt_tokens, positions, k=k, seed=seed,
                                    temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                    backend=self.backend, batch_size=self.batch_size, return_logprobs=logprobs)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Nothing to do: the weights are the model's own (``weights`` is not read)."""

    def close(self) -> None:
        """Nothing to free: the model belongs to the trainer."""


def sampling_copy(policy) -> torch.nn.Module:
    """A plain transformers model of ``policy``'s architecture (a LoRA model's base, untied where its
    merged weights are: :func:`oaif.generation.weights.untied_lora`), in its dtype and on its device,
    without gradients, in eval mode, with its generation config. Its weights are whatever
    :meth:`PolicyCopy.load_weights` puts there."""
    from transformers import AutoModelForCausalLM

    from oaif.generation.weights import untied_lora
    from oaif.models.modules import is_peft

    base = policy.get_base_model() if is_peft(policy) else policy
    config = copy.deepcopy(base.config)
    if untied_lora(policy):
        config.tie_word_embeddings = False
    first = next(base.parameters())
    with torch.device(first.device):
        model = AutoModelForCausalLM.from_config(config, dtype=first.dtype)
    model.generation_config = copy.deepcopy(base.generation_config)
    return model.requires_grad_(False).eval()


class PolicyCopy(LivePolicy):
    """The transformers backends on a copy of the policy (:func:`sampling_copy`) that takes the policy's
    weights in :meth:`load_weights`, like a vLLM engine: what the worker of ``train.async_steps`` samples."""

    def __init__(self, policy, tokenizer, backend: str = "shared_prefill", batch_size: int = 0,
                 autocast: Callable = nullcontext):
        super().__init__(sampling_copy(policy), tokenizer, backend, batch_size, autocast)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy these weights (:func:`oaif.generation.weights.policy_weights`: checkpoint names) into the copy."""
        from oaif.generation.weights import runtime_names

        with torch.no_grad():
            tensors = runtime_names(self.model, dict(weights))
            missing, unexpected = self.model.load_state_dict(tensors, strict=False)
        tied = getattr(self.model.config, "tie_word_embeddings", False)
        missing = [k for k in missing if not (tied and k.endswith("lm_head.weight"))]
        if missing or unexpected:
            raise GenerationError(f"the policy's weights do not fit its sampling copy: missing {missing[:3]}, "
                                  f"unexpected {unexpected[:3]}")

    def close(self) -> None:
        self.model = None
