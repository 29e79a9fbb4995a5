"""In-process LLM judge: a causal LM reads a rubric and the next-token odds of the labels.

For each pair and each order, the judge prompt is the rubric rendered in the judge's chat
template, followed by the rubric's ``answer_prefix``. The preference is the softmax over the
log-probs of the two label tokens at the next position, so it is a probability, not a parsed
string. Both orders of every pair go through the same batched forward passes, and the token
prefix shared by all judge prompts (system message and rubric preamble) is computed once and
reused through the KV cache.

The prompt and responses are data: look-alikes of the rubric's delimiter tags are neutralized,
and the values are tokenized apart from the template with special-token parsing off
(:class:`~oaif.annotators.untrusted.SlotEncoder`), so no special token id comes from a response.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from typing import Sequence

import torch

from oaif.annotators.base import Judgment, PairRequest, checked, combine_orders, eval_mode
from oaif.annotators.rubrics import REQUIRED_VARIABLES, Rubric
from oaif.annotators.untrusted import SlotEncoder
from oaif.errors import AnnotatorError
from oaif.models.modules import kv_cache_key
from oaif.stats import sigmoid

log = logging.getLogger("oaif.annotators")


def label_token_ids(tokenizer, answer_prefix: str, labels: Sequence[str]) -> list[int]:
    """The token that each label adds right after the answer prefix; each must be one token."""
    base = "Judge." + answer_prefix
    base_ids = tokenizer(base, add_special_tokens=False)["input_ids"]
    out = []
    for label in labels:
        ids = tokenizer(base + label, add_special_tokens=False)["input_ids"]
        if ids[: len(base_ids)] != base_ids or len(ids) != len(base_ids) + 1:
            raise AnnotatorError(f"rubric label {label!r} is not a single token after the answer prefix "
                                 f"{answer_prefix!r} for this judge's tokenizer; choose another label or prefix")
        out.append(ids[-1])
    if len(set(out)) != len(out):
        raise AnnotatorError(f"rubric labels {list(labels)!r} map to the same token")
    return out


def _common_prefix_len(seqs: list[list[int]]) -> int:
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for i in range(n):
        t = first[i]
        if any(s[i] != t for s in seqs):
            return i
    return n


class LLMJudge:
    """A pairwise judge backed by a transformers causal LM held in this process."""

    def __init__(self, model, tokenizer, rubric: Rubric, *, both_orders: bool = True, batch_size: int = 8,
                 max_length: int = 1024, share_prefix: bool = True, name: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.rubric = rubric
        self.both_orders = both_orders
        self.batch_size = max(1, batch_size)
        self.max_length = max_length
        self.share_prefix = share_prefix
        self.name = name or f"llm:{getattr(model.config, '_name_or_path', 'judge') or 'judge'}:{rubric.name}"
        self.label_ids = label_token_ids(tokenizer, rubric.answer_prefix, rubric.labels)
        self._encoder = self._slot_encoder()

    # -- prompt building -------------------------------------------------------------------
    def _wrap(self, user: str) -> str:
        """The full judge prompt around the user message: chat template (or plain text) and answer prefix."""
        if getattr(self.tokenizer, "chat_template", None):
            messages = ([{"role": "system", "content": self.rubric.system}] if self.rubric.system else [])
            messages.append({"role": "user", "content": user})
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            text = (self.rubric.system + "\n\n" if self.rubric.system else "") + user + "\n"
        return text + self.rubric.answer_prefix

    def _slot_encoder(self) -> SlotEncoder:
        encoder = SlotEncoder(self.tokenizer, self._wrap(self.rubric.render_slots()))
        if sorted(encoder.names()) != sorted(REQUIRED_VARIABLES):
            raise AnnotatorError(f"the chat template of judge {self.name} changes the message text, so the "
                                 f"responses cannot be kept apart from it; use another judge model")
        return encoder

    def judge_text(self, context: str, first: str, second: str) -> str:
        """The judge prompt as text (for people: the tokens come from :meth:`judge_tokens`)."""
        return self._wrap(self.rubric.render(context, first, second))

    def judge_tokens(self, context: str, first: str, second: str) -> list[int]:
        """The judge prompt's token ids; no special token id comes from ``context``, ``first`` or ``second``."""
        clean = self.rubric.clean
        return self._encoder.encode({"context": clean(context), "response_1": clean(first), "response_2": clean(second)})

    # -- scoring ---------------------------------------------------------------------------
    @torch.no_grad()
    def label_logprobs(self, sequences: list[list[int]]) -> torch.Tensor:
        """(n, 2) log-probs of the two label tokens after each sequence (full-vocabulary softmax).

        The model runs in eval mode (no dropout) for the whole call, shared prefix included, and
        is returned to the mode it was in.
        """
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        out = torch.empty((len(sequences), 2))
        prefix_len = _common_prefix_len(sequences) if self.share_prefix and len(sequences) > 1 else 0
        # keep at least one token of every sequence outside the prefix, so each row has a last logit
        prefix_len = min(prefix_len, min(len(s) for s in sequences) - 1)
        with eval_mode(self.model):
            prefix_cache = self._prefix_cache(sequences[0][:prefix_len]) if prefix_len > 0 else None
            for start in range(0, len(order), self.batch_size):
                rows = order[start:start + self.batch_size]
                out[rows] = self._suffix_logprobs([sequences[i][prefix_len:] for i in rows], prefix_len, prefix_cache)
        return out

    def _prefix_cache(self, prefix: list[int]):
        device = next(self.model.parameters()).device
        ids = torch.tensor([prefix], device=device)
        return self.model(input_ids=ids, use_cache=True, logits_to_keep=1)[kv_cache_key()]

    def _suffix_logprobs(self, suffixes: list[list[int]], prefix_len: int, prefix_cache) -> torch.Tensor:
        """Label log-probs of left-padded ``suffixes`` that follow the cached ``prefix_len`` tokens."""
        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        n, width = len(suffixes), max(len(s) for s in suffixes)
        ids = torch.full((n, width), pad, dtype=torch.long)
        mask = torch.zeros((n, prefix_len + width), dtype=torch.long)
        mask[:, :prefix_len] = 1
        pos = torch.zeros((n, width), dtype=torch.long)
        for j, s in enumerate(suffixes):
            ids[j, width - len(s):] = torch.tensor(s)
            mask[j, prefix_len + width - len(s):] = 1
            pos[j, width - len(s):] = torch.arange(prefix_len, prefix_len + len(s))
        kwargs = dict(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                      use_cache=prefix_cache is not None, logits_to_keep=1)
        if prefix_cache is not None:
            cache = copy.deepcopy(prefix_cache)
            cache.batch_repeat_interleave(n)
            kwargs[kv_cache_key()] = cache
        logits = self.model(**kwargs).logits[:, -1].float()
        return logits.log_softmax(-1)[:, self.label_ids].cpu()

    def annotate(self, requests: Sequence[PairRequest]) -> list[Judgment]:
        if not requests:
            return []
        t0 = time.perf_counter()
        jobs: list[tuple[int, int, list[int]]] = []  # (request index, order 0=ab 1=ba, tokens)
        too_long: set[int] = set()
        for i, r in enumerate(requests):
            orders = [(r.a, r.b), (r.b, r.a)] if self.both_orders else [(r.a, r.b)]
            for o, (first, second) in enumerate(orders):
                toks = self.judge_tokens(r.prompt, first, second)
                if len(toks) > self.max_length:
                    too_long.add(i)
                else:
                    jobs.append((i, o, toks))
        jobs = [j for j in jobs if j[0] not in too_long]
        readings: dict[tuple[int, int], tuple[float, float]] = {}
        if jobs:
            logp = self.label_logprobs([j[2] for j in jobs])
            for (i, o, _), (l1, l2) in zip(jobs, logp.tolist()):
                finite = math.isfinite(l1) and math.isfinite(l2)
                p_first = sigmoid(l1 - l2) if finite else float("nan")
                mass = math.exp(l1) + math.exp(l2) if finite else float("nan")
                readings[(i, o)] = (p_first if o == 0 else 1.0 - p_first, mass)
        latency = (time.perf_counter() - t0) / len(requests)
        judgments = []
        for i in range(len(requests)):
            if i in too_long:
                log.warning("judge prompt over %d tokens for prompt %s: pair masked", self.max_length, requests[i].prompt_id)
                judgments.append(Judgment.failed("too_long", self.name, latency))
                continue
            p_ab, mass_ab = readings[(i, 0)]
            if self.both_orders:
                p_ba, mass_ba = readings[(i, 1)]
                j = combine_orders(p_ab, p_ba, self.name, latency, label_mass=(mass_ab + mass_ba) / 2)
            else:
                j = checked(p_ab, self.name, latency, label_mass=mass_ab)
                j.prob_ab = j.prob
            if not j.ok:
                log.warning("judge gave no finite probability for prompt %s (%s): pair masked", requests[i].prompt_id, j.failure)
            judgments.append(j)
        return judgments
