"""The transformers backends (``shared_prefill``, ``hf``) behind the :class:`~oaif.generation.base.Generator` interface.

They sample the training policy itself, so the trainer calls every backend the same way: a
weight push after an optimizer step has nothing to do here (the policy already holds them).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Iterable

import torch

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
