"""Step 1 of the loop: sample K responses per prompt from the current policy.

The default ``shared_prefill`` backend prefills each prompt once, copies its KV cache K times
and decodes all ``B * K`` rows together, so the prompt is never recomputed per sample. The ``hf``
backend runs ``transformers`` ``generate`` greedily on scores that single out the same draws
(a logits processor). In both, the draw of row r at decoding step t is an inverse-CDF sample
from the temperature-scaled, top-p-filtered softmax with one uniform number u(r, t), a hash of
(seed, prompt stream position, k, t) (:func:`step_uniforms`): the responses to a prompt do not
depend on which other prompts share its batch, on the number of processes, or on whether the
run was resumed. One number per row and step (not one per vocabulary entry), computed for the
whole response up front, with no random generator state.

With ``return_logprobs`` both also give the log-probability of each drawn token under the raw
logits (log-softmax, no temperature, no top-p): the numbers the update recomputes from the same
weights, so their difference (``logprob_gap``) measures the weights, not the sampling settings.
One value per row and step is gathered; no full-vocabulary tensor is kept.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from oaif.step.logprobs import pad_rows, position_ids_from_mask, token_logprobs
from oaif.step.records import Rollouts


def row_seed(seed: int, position: int, k: int) -> int:
    """A well-mixed 63-bit seed for one sample (splitmix64 of the three numbers)."""
    x = (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9 + k * 0x94D049BB133111EB + 1) & (2**64 - 1)
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    return x & (2**63 - 1)


def filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Set to -inf every token outside the smallest set whose probability reaches ``top_p``."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # mass of strictly better tokens
    drop_sorted = before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & (2**64 - 1)
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return x ^ (x >> 31)


def step_uniforms(seeds: list[int], steps: int) -> torch.Tensor:
    """``(len(seeds), steps)`` float64 uniforms in (0, 1): entry (r, t) a hash of (``seeds[r]``, t), 53 bits."""
    return torch.tensor([[((_splitmix64(s ^ _splitmix64(t)) >> 11) + 0.5) / 2**53 for t in range(steps)] for s in seeds],
                        dtype=torch.float64)


class RowSampler:
    """Inverse-CDF sampling of one token per row and step, each row from its own hashed uniforms.

    Call it once per decoding step (it counts the steps); ``steps`` bounds how many calls it serves.
    The probabilities and their cumulative sum are taken in float64, so every token with a
    representable probability gets its share, and a vanishing temperature decodes greedily.
    """

    def __init__(self, seeds: list[int], device: torch.device, steps: int = 1):
        self.uniforms = step_uniforms(seeds, steps).to(device)
        self.step = 0

    def __call__(self, logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
        scores = filter_top_p(logits.float() / temperature, top_p)
        cdf = scores.softmax(-1, dtype=torch.float64).cumsum_(-1)
        u = self.uniforms[:, self.step, None] * cdf[:, -1:]
        self.step += 1
        return torch.searchsorted(cdf, u).clamp_(max=cdf.shape[-1] - 1).squeeze(-1)


class _RowDraws:
    """A ``generate`` logits processor: scores that are 0 at the row's draw and -inf elsewhere, so
    greedy decoding takes the same draws as :class:`RowSampler`. It is the only processor (see
    :func:`_own_generation_config`), so ``scores`` are the raw logits; with ``logprobs`` it keeps
    each draw's raw log-probability, one ``(rows,)`` tensor per step."""

    def __init__(self, sampler: RowSampler, temperature: float, top_p: float, logprobs: bool = False):
        self.sampler, self.temperature, self.top_p = sampler, temperature, top_p
        self.logprobs: list[torch.Tensor] | None = [] if logprobs else None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        picked = self.sampler(scores, self.temperature, self.top_p)
        if self.logprobs is not None:
            self.logprobs.append(token_logprobs(scores, picked))
        return torch.full_like(scores, float("-inf")).scatter_(-1, picked[:, None], 0.0)


def template_end_of_turn(tokenizer) -> int | None:
    """The special token a chat template writes right after an assistant message (``<|im_end|>``,
    ``<|eot_id|>``, ``<end_of_turn>``, ...); None without a template, or when what follows is not one."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    probe = "oaifProbeReply"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": probe}],
                                             tokenize=False)
    except Exception:  # jinja raises its own errors for templates that reject this conversation
        return None
    if not isinstance(text, str) or probe not in text:
        return None
    after = tokenizer(text[text.rindex(probe) + len(probe):].lstrip(), add_special_tokens=False)["input_ids"]
    added = getattr(tokenizer, "added_tokens_decoder", {})
    special = set(tokenizer.all_special_ids) | {i for i, t in added.items() if getattr(t, "special", False)}
    return int(after[0]) if after and after[0] in special else None


def eos_token_ids(model: torch.nn.Module, tokenizer) -> set[int]:
    """The ids that end a response: the tokenizer's EOS, the model's ``generation_config.eos_token_id``, and the
    token its chat template ends an assistant turn with (:func:`template_end_of_turn`), which some models
    list in neither (a response to a templated prompt would otherwise run past its turn to the length limit)."""
    ids = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, gen_eos, template_end_of_turn(tokenizer)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    if not ids:
        raise ValueError("the tokenizer has no EOS token; sampling could not stop")
    return ids


def _first_eos(tokens: torch.Tensor, eos: set[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lengths, ended)`` of each row of ``(n, T)`` tokens: up to and including its first EOS, else T."""
    hit = torch.isin(tokens, torch.tensor(sorted(eos), device=tokens.device))
    ended = hit.any(-1)
    first = hit.int().argmax(-1)  # the first maximum: the first EOS of rows that have one
    return torch.where(ended, first + 1, torch.full_like(first, tokens.shape[1])), ended


@torch.no_grad()
def _sample_shared_prefill(model, prompts, seeds, k, temperature, top_p, max_new_tokens, eos, pad_id, want_logprobs):
    from oaif.models.modules import kv_cache_key

    device = next(model.parameters()).device
    ids, mask = (t.to(device) for t in pad_rows(prompts, pad_id, side="left"))
    cache_key = kv_cache_key()
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                use_cache=True, logits_to_keep=1)
    cache = out[cache_key]
    cache.batch_repeat_interleave(k)
    logits = out.logits[:, -1].repeat_interleave(k, dim=0)
    mask = mask.repeat_interleave(k, dim=0)
    next_pos = mask.sum(-1, keepdim=True)  # position of the first response token
    sampler = RowSampler(seeds, device, max_new_tokens)
    n, width = len(seeds), mask.shape[1]
    mask = torch.cat([mask, torch.ones((n, max_new_tokens), dtype=mask.dtype, device=device)], dim=1)
    eos_t = torch.tensor(sorted(eos), device=device)
    tokens = torch.full((n, max_new_tokens), pad_id, dtype=torch.long, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    logprobs = torch.zeros((n, max_new_tokens), dtype=torch.float32, device=device) if want_logprobs else None
    # asking whether every row ended waits for the device: on an accelerator, ask every few tokens
    check_every = 1 if device.type == "cpu" else 8
    for t in range(max_new_tokens):
        nxt = sampler(logits, temperature, top_p)
        if logprobs is not None:  # the draw's raw log-prob (rows already done are cut off later)
            logprobs[:, t] = token_logprobs(logits, nxt)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        tokens[:, t] = nxt
        done |= torch.isin(nxt, eos_t)
        if t == max_new_tokens - 1 or ((t + 1) % check_every == 0 and bool(done.all())):
            break
        out = model(input_ids=nxt[:, None], attention_mask=mask[:, :width + t + 1], position_ids=next_pos + t,
                    use_cache=True, **{cache_key: cache})
        logits = out.logits[:, -1]
    lengths, ended = _first_eos(tokens, eos)
    return tokens.cpu(), lengths.cpu(), ended.cpu(), None if logprobs is None else logprobs.cpu()


@contextmanager
def _own_generation_config(model):
    """Hide the model's ``generation_config`` from ``generate`` while it runs.

    ``generate`` fills every field its config leaves unset from ``model.generation_config``, so a
    model that ships ``repetition_penalty``, ``min_new_tokens`` (which suppresses EOS),
    ``no_repeat_ngram_size``, ``bad_words_ids``, ... would be sampled from another distribution
    than the policy's. An empty config in its place leaves only transformers' neutral defaults.
    """
    from transformers import GenerationConfig

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model generates with its base
    saved = inner.generation_config
    inner.generation_config = GenerationConfig()
    try:
        yield
    finally:
        inner.generation_config = saved


@torch.no_grad()
def _sample_hf(model, prompts, seeds, k, temperature, top_p, max_new_tokens, eos, pad_id, want_logprobs):
    from transformers import GenerationConfig, LogitsProcessorList

    device = next(model.parameters()).device
    ids, mask = (t.repeat_interleave(k, dim=0).to(device) for t in pad_rows(prompts, pad_id, side="left"))
    # greedy decoding of the draws, under a config that sets nothing else (see _own_generation_config)
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                              eos_token_id=sorted(eos))
    draws = _RowDraws(RowSampler(seeds, device, max_new_tokens), temperature, top_p, want_logprobs)
    with _own_generation_config(model):
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                             logits_processor=LogitsProcessorList([draws]))
    gen = out[:, ids.shape[1]:].cpu()
    tokens = torch.full((gen.shape[0], max_new_tokens), pad_id, dtype=torch.long)
    tokens[:, :gen.shape[1]] = gen
    lengths, ended = _first_eos(tokens, eos)
    logprobs = None
    if want_logprobs:
        logprobs = torch.zeros((gen.shape[0], max_new_tokens), dtype=torch.float32)
        if draws.logprobs:
            steps = torch.stack(draws.logprobs, dim=1).cpu()
            logprobs[:, :steps.shape[1]] = steps
    return tokens, lengths, ended, logprobs


def sample_responses(model, tokenizer, prompt_tokens: list[list[int]], positions: list[int], *, k: int,
                     seed: int, temperature: float, top_p: float, max_new_tokens: int,
                     backend: str = "shared_prefill", batch_size: int = 0, return_logprobs: bool = False):
    """Sample ``k`` responses for each prompt.

    Returns ``(responses, ended_eos)``: ``responses[b][k]`` is the token list up to and including
    the first EOS (or ``max_new_tokens`` tokens), ``ended_eos[b][k]`` whether it stopped at EOS.
    ``return_logprobs``: ``(responses, ended_eos, logprobs)``, ``logprobs[b][k]`` the raw (untempered,
    unfiltered) log-probability of each token of ``responses[b][k]`` under the weights that drew it.
    """
    eos = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)
    fn = {"shared_prefill": _sample_shared_prefill, "hf": _sample_hf}[backend]
    was_training = model.training
    model.eval()
    responses: list[list[list[int]]] = []
    ended_eos: list[list[bool]] = []
    logprobs: list[list[list[float]]] = []
    step = batch_size if batch_size > 0 else len(prompt_tokens)
    try:
        for start in range(0, len(prompt_tokens), step):
            chunk = prompt_tokens[start:start + step]
            seeds = [row_seed(seed, pos, j) for pos in positions[start:start + step] for j in range(k)]
            tokens, lengths, ended, lps = fn(model, chunk, seeds, k, temperature, top_p, max_new_tokens, eos, pad_id,
                                             return_logprobs)
            for b in range(len(chunk)):
                rows = range(b * k, (b + 1) * k)
                responses.append([tokens[r, : int(lengths[r])].tolist() for r in rows])
                ended_eos.append([bool(ended[r]) for r in rows])
                if return_logprobs:
                    logprobs.append([lps[r, : int(lengths[r])].tolist() for r in rows])
    finally:
        model.train(was_training)
    return (responses, ended_eos, logprobs) if return_logprobs else (responses, ended_eos)


def sample_rollouts(generator, tokenizer, batch: list, prompt_tokens: dict[str, list[int]], cfg, seed: int) -> Rollouts:
    """Step 1 for ``(stream position, PromptRecord)`` pairs: ``generator.sample`` (any
    :class:`oaif.generation.base.Generator`) with the settings of ``cfg`` (a
    :class:`oaif.config.SamplingConfig`), decoded into :class:`Rollouts`, with the sampler's
    log-probabilities of the drawn tokens (None from a sampler that reports none)."""
    records = [rec for _, rec in batch]
    positions = [pos for pos, _ in batch]
    tokens = [prompt_tokens[r.id] for r in records]
    responses, ended, logprobs = generator.sample(tokens, positions, k=cfg.num_samples, seed=seed,
                                                  temperature=cfg.temperature, top_p=cfg.top_p,
                                                  max_new_tokens=cfg.max_new_tokens, logprobs=True)
    texts = [[tokenizer.decode(r, skip_special_tokens=True).strip() for r in rs] for rs in responses]
    return Rollouts(positions=positions, prompt_ids=[r.id for r in records], prompt_texts=[r.text for r in records],
                    prompt_tokens=tokens, responses=responses, texts=texts, ended_eos=ended, sample_logprobs=logprobs)
