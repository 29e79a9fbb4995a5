"""The typed records passed between the step's parts: sampling -> annotation -> pairs -> update.

They hold plain lists and counters (no tensors, no models), so the run's bookkeeping (metrics,
the audit log) and the step's parts import them without importing each other.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from oaif.annotators.base import Judgment, PairRequest


@dataclass
class Rollouts:
    """What sampling hands to annotation: K responses for each of B prompts."""

    positions: list[int]  # global stream position of each prompt (unique per consumption)
    prompt_ids: list[str]  # the prompt records' ids
    prompt_texts: list[str]  # prompts as plain text, for the judge
    prompt_tokens: list[list[int]]  # templated prompt token ids
    responses: list[list[list[int]]]  # [b][k] response token ids (EOS included when it ended)
    texts: list[list[str]]  # [b][k] decoded responses
    ended_eos: list[list[bool]]  # [b][k]
    # [b][k][token]: each drawn token's log-prob under the weights that sampled it, from the raw logits (no
    # temperature, no top-p), as the sampler reported it; None where the sampler reports none (offline: a file)
    sample_logprobs: list[list[list[float]]] | None = None

    @property
    def num_prompts(self) -> int:
        return len(self.responses)

    @property
    def k(self) -> int:
        return len(self.responses[0]) if self.responses else 0

    def flat(self, b: int, k: int) -> int:
        """Index of response (b, k) in row-major order."""
        return b * self.k + k


@dataclass
class PairPlan:
    """The pairs to judge, as (prompt row, k_a, k_b), and those masked before judging."""

    pairs: list[tuple[int, int, int]]
    requests: list[PairRequest]
    identical: int = 0


@dataclass
class PreferenceBatch:
    """Training pairs as flat response indices into the rollouts (row-major b * K + k)."""

    chosen: list[int]
    rejected: list[int]
    label_probs: list[float]  # P(chosen better): 1.0 with hard labels
    masked: Counter = field(default_factory=Counter)  # reason -> count (identical, tie)
    failed: Counter = field(default_factory=Counter)  # failure reason -> count
    comparisons: list[int] = field(default_factory=list)  # best_worst: successful comparisons behind each pair

    @property
    def size(self) -> int:
        return len(self.chosen)

    def responses_used(self) -> list[int]:
        """Flat indices of every response that appears in a pair, each once, in order."""
        return sorted(set(self.chosen) | set(self.rejected))


@dataclass
class Collected:
    """One online micro-batch after steps 1-3, with the weights' version that sampled it (optimizer steps)."""

    rollouts: Rollouts
    plan: PairPlan
    judgments: list[Judgment]
    prefs: PreferenceBatch
    version: int
    time_sample_s: float = 0.0
    time_annotate_s: float = 0.0
