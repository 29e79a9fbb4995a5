"""Per-sequence log-probabilities of response tokens, for the loss and the KL estimate.

Sequences are laid out as ``[left-padded prompt | right-padded response]``, so every response
starts at the same column ``P``. The model then only has to project the last ``R + 1`` hidden
states to the vocabulary (``logits_to_keep``), not the prompt's, which is where most of a
forward pass's memory goes for short responses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SequenceBatch:
    input_ids: torch.Tensor  # (n, P + R)
    attention_mask: torch.Tensor  # (n, P + R)
    position_ids: torch.Tensor  # (n, P + R), counting real tokens only
    response_mask: torch.Tensor  # (n, R) 1 on response tokens, 0 on padding
    prompt_width: int  # P

    def to(self, device: torch.device | str) -> "SequenceBatch":
        return SequenceBatch(self.input_ids.to(device), self.attention_mask.to(device),
                             self.position_ids.to(device), self.response_mask.to(device), self.prompt_width)

    @property
    def response_width(self) -> int:
        return self.response_mask.shape[1]


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: the first real token of each row is position 0."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def pack_sequences(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> SequenceBatch:
    """Pack prompt/response token lists into the left-prompt, right-response layout."""
    if len(prompts) != len(responses) or not prompts:
        raise ValueError("need the same, non-zero number of prompts and responses")
    P = max(len(p) for p in prompts)
    R = max(1, max(len(r) for r in responses))
    n = len(prompts)
    ids = torch.full((n, P + R), pad_id, dtype=torch.long)
    mask = torch.zeros((n, P + R), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, P - len(p):P] = torch.tensor(p, dtype=torch.long)
        mask[i, P - len(p):P] = 1
        if r:
            ids[i, P:P + len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, P:P + len(r)] = 1
    return SequenceBatch(ids, mask, position_ids_from_mask(mask), mask[:, P:].clone(), P)


def _response_logits(model: torch.nn.Module, batch: SequenceBatch) -> torch.Tensor:
    keep = batch.response_width + 1
    kwargs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                  position_ids=batch.position_ids, use_cache=False)
    try:
        logits = model(**kwargs, logits_to_keep=keep).logits
    except TypeError:  # models without logits_to_keep
        logits = model(**kwargs).logits
    return logits[:, -keep:-1]


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[labels] without materialising the full log-softmax tensor."""
    logits = logits.float()
    picked = torch.gather(logits, -1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def sequence_logprobs(model: torch.nn.Module, batch: SequenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs (n,) and per-token log-probs (n, R), zero on padding."""
    logits = _response_logits(model, batch)
    labels = batch.input_ids[:, batch.prompt_width:]
    per_token = token_logprobs(logits, labels) * batch.response_mask
    return per_token.sum(-1), per_token
