"""What every generation backend shares: the interface, the stop rule, and one request per sample.

A backend receives B prompts and returns K responses for each. Internally each (prompt, k) is
one request with its own seed, ``row_seed(seed, position, k)`` from :mod:`oaif.step.sampling`, so a
response depends only on the weights, the prompt, the run seed, the prompt's position in the
prompt stream and k; not on which other prompts share the batch, the number of processes, or
whether the run was resumed. The draws differ from the ``shared_prefill`` backend's (another
random number generator); the distribution is the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol

import torch

from oaif.errors import OaifError
from oaif.step.sampling import row_seed

#: vLLM samples greedily below this temperature; oaif's own backends are greedy near 0 as well.
GREEDY_BELOW = 1e-5


class GenerationError(OaifError):
    """A generation backend cannot be built, reached or updated (the message says which and why)."""


@dataclass(frozen=True)
class StopRules:
    """When a response ends: at the first of ``eos_ids`` (kept in the response) or after ``max_new_tokens``.

    ``eos_ids`` are the model's EOS and end-of-turn ids, :func:`oaif.step.sampling.eos_token_ids`;
    nothing else stops a response (a backend's own idea of EOS is switched off).
    """

    eos_ids: frozenset[int]

    def __post_init__(self):
        if not self.eos_ids:
            raise GenerationError("generation needs at least one EOS token id to stop at")

    def cut(self, tokens: list[int]) -> tuple[list[int], bool]:
        """``tokens`` up to and including the first EOS, and whether there was one."""
        for i, t in enumerate(tokens):
            if t in self.eos_ids:
                return list(tokens[: i + 1]), True
        return list(tokens), False


@dataclass(frozen=True)
class SampleRow:
    """One sample to draw: response ``k`` of prompt ``b``, from its own seed."""

    b: int
    k: int
    prompt: list[int]
    seed: int


def sample_rows(prompt_tokens: list[list[int]], positions: list[int], k: int, seed: int) -> list[SampleRow]:
    """The B * K requests of one sampling call, prompt-major (b, then k)."""
    if len(prompt_tokens) != len(positions):
        raise ValueError(f"{len(prompt_tokens)} prompts but {len(positions)} positions")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    return [SampleRow(b, j, list(p), row_seed(seed, pos, j))
            for b, (p, pos) in enumerate(zip(prompt_tokens, positions)) for j in range(k)]


def regroup(rows: list[SampleRow], outputs: list[list[int]], stop: StopRules, num_prompts: int, k: int,
            logprobs: list[list[float]] | None = None):
    """``(responses[b][k], ended_eos[b][k])`` from one output token list per row; given ``logprobs``
    (one list per row, a value per output token), ``(responses, ended_eos, logprobs[b][k])``, cut alike."""
    responses: list[list[list[int]]] = [[[] for _ in range(k)] for _ in range(num_prompts)]
    ended: list[list[bool]] = [[False] * k for _ in range(num_prompts)]
    lps: list[list[list[float]]] = [[[] for _ in range(k)] for _ in range(num_prompts)]
    for i, (row, tokens) in enumerate(zip(rows, outputs, strict=True)):
        responses[row.b][row.k], ended[row.b][row.k] = stop.cut(tokens)
        if logprobs is not None:
            if len(logprobs[i]) != len(tokens):
                raise GenerationError(f"the sampler returned {len(logprobs[i])} log-probs for {len(tokens)} tokens")
            lps[row.b][row.k] = [float(v) for v in logprobs[i][:len(responses[row.b][row.k])]]
    return (responses, ended) if logprobs is None else (responses, ended, lps)


def request_params(row_seed: int, temperature: float, top_p: float, max_new_tokens: int, stop: StopRules) -> dict:
    """vLLM sampling parameters of one row (``SamplingParams`` keywords, also valid in a completion request).

    Every filter and penalty is set explicitly, so a server's defaults (e.g. from the model's
    ``generation_config.json``) cannot change the distribution; only ``stop.eos_ids`` end a
    response (``ignore_eos`` switches off the engine's own EOS). Greedy below ``GREEDY_BELOW``.
    """
    greedy = temperature < GREEDY_BELOW
    return dict(n=1, temperature=0.0 if greedy else float(temperature), top_p=1.0 if greedy else float(top_p),
                top_k=0, min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
                max_tokens=int(max_new_tokens), stop_token_ids=sorted(stop.eos_ids), ignore_eos=True,
                seed=None if greedy else int(row_seed))


class Generator(Protocol):
    """A sampling backend the trainer calls instead of :func:`oaif.step.sampling.sample_responses`."""

    def sample(self, prompt_tokens: list[list[int]], positions: list[int], *, k: int, seed: int,
               temperature: float, top_p: float, max_new_tokens: int, logprobs: bool = False) -> tuple:
        """``k`` responses per prompt: ``(responses[b][k], ended_eos[b][k])``, as ``sample_responses``.

        ``logprobs``: ``(responses, ended_eos, logprobs[b][k])``, the log-probability of each response
        token under the weights that sampled it, from the raw logits (log-softmax without temperature
        or top-p: what the update recomputes, so ``logprob_gap`` measures the weights); the third item
        is None from a backend that cannot report them.
        """
        ...

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace the sampled model's weights with these (transformers names), in place."""
        ...

    def close(self) -> None:
        """Free the engine (a server is left running: whoever started it stops it)."""
        ...
