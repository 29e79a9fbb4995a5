"""Per-sequence log-probabilities of response tokens, for the loss and the KL estimate.

Sequences are laid out as ``[left-padded prompt | right-padded response]``, so every response
starts at the same column ``P``. The model then only has to project the last ``R + 1`` hidden
states to the vocabulary (``logits_to_keep``), not the prompt's, which is where most of a
forward pass's memory goes for short responses.

:func:`pad_rows` is the one padding builder of the package (sampling left-pads its prompts with
it); :func:`position_ids_from_mask` gives the matching position ids.
"""

from __future__ import annotations

import functools
import inspect
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


def pad_rows(rows: list[list[int]], pad_id: int, *, side: str = "left",
             width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)``: token lists in a ``(len(rows), width)`` tensor (default width: the longest row),
    padded with ``pad_id`` on the left (``side="left"``, rows end in the last column) or the right."""
    width = max(len(r) for r in rows) if width is None else width
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        cols = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, cols] = torch.tensor(row, dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


def pack_sequences(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> SequenceBatch:
    """Pack prompt/response token lists into the left-prompt, right-response layout."""
    if len(prompts) != len(responses) or not prompts:
        raise ValueError("need the same, non-zero number of prompts and responses")
    prompt_ids, prompt_mask = pad_rows(prompts, pad_id, side="left")
    response_ids, response_mask = pad_rows(responses, pad_id, side="right",
                                           width=max(1, max(len(r) for r in responses)))
    mask = torch.cat([prompt_mask, response_mask], dim=1)
    return SequenceBatch(torch.cat([prompt_ids, response_ids], dim=1), mask, position_ids_from_mask(mask),
                         response_mask, prompt_ids.shape[1])


@functools.lru_cache(maxsize=None)
def _forward_takes_logits_to_keep(model_type: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_type.forward).parameters


def takes_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the transformers model inside ``model`` (DDP, accelerate, peft wrappers) accepts ``logits_to_keep``."""
    from oaif.models import base_model

    return _forward_takes_logits_to_keep(type(base_model(model)))


def _response_logits(model: torch.nn.Module, batch: SequenceBatch) -> torch.Tensor:
    keep = batch.response_width + 1
    kwargs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                  position_ids=batch.position_ids, use_cache=False)
    if takes_logits_to_keep(model):
        kwargs["logits_to_keep"] = keep
    return model(**kwargs).logits[:, -keep:-1]


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
