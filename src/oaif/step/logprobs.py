"""Per-sequence log-probabilities of response tokens, for the loss and the KL estimate.

A batch holds each distinct prompt once (left-padded, so every prompt ends in the last column
``P - 1``) and its responses (right-padded to ``R``). By default the model forwards the prompts
once, then every response on top of its prompt's KV cache: the K responses of a prompt share the
prompt's forward (and its backward), where packing ``prompt + response`` rows would compute the
prompt K times. The gradient is the same; only the rounding of a different matmul shape differs.
Models that take no KV cache, and policies with gradient checkpointing (which turns the cache
off in training), forward ``[left-padded prompt | right-padded response]`` rows instead
(:meth:`SequenceBatch.joined`). Either way only the states that predict a response token reach
the output head.

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
    """Responses and their prompts, each distinct prompt once."""

    prompt_ids: torch.Tensor  # (m, P) the distinct prompts, left-padded
    prompt_mask: torch.Tensor  # (m, P)
    owner: torch.Tensor  # (n,) the prompt row of each response
    response_ids: torch.Tensor  # (n, R) right-padded
    response_mask: torch.Tensor  # (n, R) 1 on response tokens, 0 on padding

    def to(self, device: torch.device | str) -> "SequenceBatch":
        return SequenceBatch(*(t.to(device) for t in (self.prompt_ids, self.prompt_mask, self.owner,
                                                        self.response_ids, self.response_mask)))

    @property
    def prompt_width(self) -> int:
        return self.prompt_ids.shape[1]

    @property
    def response_width(self) -> int:
        return self.response_mask.shape[1]

    def joined(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask, position_ids)`` of ``[prompt | response]`` rows, one per response."""
        ids = torch.cat([self.prompt_ids[self.owner], self.response_ids], dim=1)
        mask = torch.cat([self.prompt_mask[self.owner], self.response_mask], dim=1)
        return ids, mask, position_ids_from_mask(mask)


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
    """Pack one prompt per response (equal prompts are stored once) and the responses."""
    if len(prompts) != len(responses) or not prompts:
        raise ValueError("need the same, non-zero number of prompts and responses")
    rows: dict[tuple[int, ...], int] = {}
    owner = [rows.setdefault(tuple(p), len(rows)) for p in prompts]
    prompt_ids, prompt_mask = pad_rows([list(p) for p in rows], pad_id, side="left")
    response_ids, response_mask = pad_rows(responses, pad_id, side="right",
                                           width=max(1, max(len(r) for r in responses)))
    return SequenceBatch(prompt_ids, prompt_mask, torch.tensor(owner, dtype=torch.long), response_ids, response_mask)


@functools.lru_cache(maxsize=None)
def _forward_takes_logits_to_keep(model_type: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_type.forward).parameters


def takes_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the transformers model inside ``model`` (DDP, accelerate, peft wrappers) accepts ``logits_to_keep``."""
    from oaif.models.modules import base_model

    return _forward_takes_logits_to_keep(type(base_model(model)))


def takes_kv_cache(model: torch.nn.Module) -> bool:
    """Whether the transformers model inside ``model`` continues from a KV cache in training: its
    forward takes one, and gradient checkpointing (which turns the cache off) is off."""
    from oaif.models.modules import activation_checkpointing, base_model, kv_cache_key

    if activation_checkpointing(model):
        return False
    return kv_cache_key() in inspect.signature(type(base_model(model)).forward).parameters


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
    from oaif.models.modules import base_model
    from oaif.models.sharding import is_sharded

    base = base_model(model)
    if is_sharded(base):  # FSDP: its head's weight is a shard outside the model's own forward
        return None
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


def _last_states(model: torch.nn.Module, head: torch.nn.Linear | None, keep: int, **inputs):
    """One forward; ``(states, dtype, output)``: the last ``keep`` columns of its final hidden states
    (``head`` given: the head itself then runs on no position, and ``dtype`` is its matmul's dtype,
    autocast's when autocast is on) or of its logits (``head`` None, ``dtype`` None)."""
    if takes_logits_to_keep(model):
        inputs["logits_to_keep"] = keep
    if head is None:
        out = model(**inputs)
        return out.logits[:, -keep:], None, out
    seen = {}

    def capture(module, args):
        h = args[0]
        device = h.device.type
        seen["hidden"] = h
        seen["dtype"] = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else module.weight.dtype
        return (h[..., :0, :],)

    handle = head.register_forward_pre_hook(capture)
    try:
        out = model(**inputs)
    finally:
        handle.remove()
    return seen["hidden"][:, -keep:], seen["dtype"], out


def _predicting_states(model: torch.nn.Module, batch: SequenceBatch, head: torch.nn.Linear | None,
                       share_prompts: bool):
    """``(states, dtype)``: for every response token, the state that predicts it (n, R, ...): the
    last prompt column for the first token, the previous response column for the others."""
    width = batch.response_width
    if not share_prompts:
        ids, mask, pos = batch.joined()
        states, dtype, _ = _last_states(model, head, width + 1, input_ids=ids, attention_mask=mask,
                                        position_ids=pos, use_cache=False)
        return states[:, :-1], dtype
    from oaif.models.modules import kv_cache_key

    key, owner = kv_cache_key(), batch.owner
    first, dtype, out = _last_states(model, head, 1, input_ids=batch.prompt_ids, attention_mask=batch.prompt_mask,
                                     position_ids=position_ids_from_mask(batch.prompt_mask), use_cache=width > 1)
    if width == 1:
        return first[owner], dtype
    cache = out[key]
    cache.batch_select_indices(owner)  # each response continues its own prompt's cache (differentiable)
    starts = batch.prompt_mask.sum(-1)[owner, None]
    rest, _, _ = _last_states(
        model, head, width - 1, input_ids=batch.response_ids[:, :-1],
        attention_mask=torch.cat([batch.prompt_mask[owner], batch.response_mask[:, :-1]], dim=1),
        position_ids=starts + torch.arange(width - 1, device=starts.device), use_cache=True, **{key: cache})
    return torch.cat([first[owner], rest], dim=1), dtype


def sequence_logprobs(model: torch.nn.Module, batch: SequenceBatch, *, chunk_tokens: int = CHUNK_TOKENS,
                      share_prompts: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs (n,) and per-token log-probs (n, R), zero on padding.

    ``share_prompts``: forward each prompt once and its responses on its KV cache (default: when
    :func:`takes_kv_cache`); False forwards ``[prompt | response]`` rows. Give a policy and its
    reference the same value, so that they compute the same numbers from the same weights.

    When the model's logits are a plain linear head of its final hidden states (most causal
    LMs), the head is applied here, to the real response tokens only and ``chunk_tokens`` at a
    time (:class:`_HeadLogprobs`): the (tokens, vocabulary) float32 logits never exist at once,
    in the forward or the backward. Other models go through their own head and full logits.
    """
    share = takes_kv_cache(model) if share_prompts is None else share_prompts
    labels = batch.response_ids
    head = _plain_output_head(model)
    states, dtype = _predicting_states(model, batch, head, share)
    if head is None:
        per_token = token_logprobs(states, labels) * batch.response_mask
        return per_token.sum(-1), per_token
    real = batch.response_mask.bool()
    picked = _HeadLogprobs.apply(states[real], head.weight, labels[real], dtype, chunk_tokens)
    per_token = torch.zeros(real.shape, dtype=torch.float32, device=picked.device).masked_scatter(real, picked)
    return per_token.sum(-1), per_token


def logprob_gap(per_token: torch.Tensor, response_mask: torch.Tensor,
                sampled: list[list[float] | None]) -> tuple[float, int]:
    """``(sum, count)`` of |``per_token`` - ``sampled``| over the real tokens of the rows with sampler log-probs.

    ``per_token`` (n, R) are a pass's per-token log-probs (:func:`sequence_logprobs`), ``response_mask``
    its (n, R) mask, ``sampled[i]`` the sampler's log-probs of row i's tokens (one per token; None: the
    sampler reported none, and the row is left out). Detached, in float64; the mean is ``sum / count``.
    """
    rows = [i for i, s in enumerate(sampled) if s is not None]
    if not rows:
        return 0.0, 0
    mask = response_mask[rows].detach().cpu().double()
    theirs = torch.zeros_like(mask)
    for j, i in enumerate(rows):
        n = int(mask[j].sum())
        if len(sampled[i]) != n:
            raise ValueError(f"row {i}: {len(sampled[i])} sampler log-probs for {n} response tokens")
        theirs[j, :n] = torch.tensor(sampled[i], dtype=torch.float64)
    ours = per_token[rows].detach().cpu().double()
    return float(((ours - theirs).abs() * mask).sum()), int(mask.sum())
