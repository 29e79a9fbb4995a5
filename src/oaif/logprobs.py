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


# Output-head attributes that transform the head's logits in some models (Gemma's soft-capping, Cohere's
# and Granite's scaling): a model with one of them set gets its logits from its own forward.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")

CHUNK_TOKENS = 256  # response tokens per output-head chunk: a (256, vocab) float32 block at a time


def _plain_output_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The transformers model's output head when its logits are exactly ``hidden @ weight.T``, else None."""
    from oaif.models import base_model

    base = base_model(model)
    get = getattr(base, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    config = getattr(base, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if any(getattr(text, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS):
        return None
    return head


class _HeadLogprobs(torch.autograd.Function):
    """log softmax(hidden @ weight.T)[labels] per token, a chunk of tokens at a time.

    Forward keeps no logits: it saves the hidden states and each token's logsumexp; backward
    recomputes one chunk's logits at a time (one extra head matmul) and accumulates the weight's
    gradient in float32. ``dtype`` is the matmul's dtype (the autocast dtype of the model's
    forward, else the weights'), so the numbers are those of the model's own head.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, dtype, chunk):
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
            lse = torch.empty_like(out)
            for s in range(0, hidden.shape[0], chunk):
                logits = torch.nn.functional.linear(hidden[s:s + chunk].to(dtype), w).float()
                lse[s:s + chunk] = torch.logsumexp(logits, dim=-1)
                out[s:s + chunk] = logits.gather(-1, labels[s:s + chunk, None]).squeeze(-1) - lse[s:s + chunk]
                del logits
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.dtype, ctx.chunk = dtype, chunk
        return out

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, labels, lse = ctx.saved_tensors
        dtype, chunk = ctx.dtype, ctx.chunk
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            for s in range(0, hidden.shape[0], chunk):
                h = hidden[s:s + chunk].to(dtype)
                g = grad[s:s + chunk].float()[:, None]
                # d logp / d logits = onehot(label) - softmax(logits)
                d = torch.nn.functional.linear(h, w).float().sub_(lse[s:s + chunk, None]).exp_().mul_(-g)
                d.scatter_add_(-1, labels[s:s + chunk, None], g)
                d = d.to(dtype)
                if want_h:
                    grad_h[s:s + chunk] = (d @ w).to(hidden.dtype)
                if want_w:
                    grad_w += (d.t() @ h).float()
                del d
        return grad_h, grad_w.to(weight.dtype) if want_w else None, None, None, None


def _response_hidden(model: torch.nn.Module, batch: SequenceBatch, head: torch.nn.Linear):
    """``(hidden, dtype)``: the final hidden states at the columns that predict the response tokens
    (n, R, hidden) from the model's own forward, with the output head skipped, and the dtype of
    its matmul in that forward (autocast's when autocast is on)."""
    seen = {}

    def capture(module, args):
        h = args[0]
        device = h.device.type
        seen["hidden"] = h
        seen["dtype"] = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else module.weight.dtype
        return (h[..., :0, :],)  # the head runs on no position

    handle = head.register_forward_pre_hook(capture)
    try:
        _response_logits(model, batch)
    finally:
        handle.remove()
    keep = batch.response_width + 1
    return seen["hidden"][:, -keep:-1], seen["dtype"]


def sequence_logprobs(model: torch.nn.Module, batch: SequenceBatch, *,
                      chunk_tokens: int = CHUNK_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs (n,) and per-token log-probs (n, R), zero on padding.

    When the model's logits are a plain linear head of its final hidden states (most causal
    LMs), the head is applied here, to the real response tokens only and ``chunk_tokens`` at a
    time (:class:`_HeadLogprobs`): the (tokens, vocabulary) float32 logits never exist at once,
    in the forward or the backward. Other models go through their own forward and full logits.
    """
    labels = batch.input_ids[:, batch.prompt_width:]
    head = _plain_output_head(model)
    if head is None:
        per_token = token_logprobs(_response_logits(model, batch), labels) * batch.response_mask
        return per_token.sum(-1), per_token
    hidden, dtype = _response_hidden(model, batch, head)
    real = batch.response_mask.bool()
    picked = _HeadLogprobs.apply(hidden[real], head.weight, labels[real], dtype, chunk_tokens)
    per_token = torch.zeros(real.shape, dtype=torch.float32, device=picked.device).masked_scatter(real, picked)
    return per_token.sum(-1), per_token
