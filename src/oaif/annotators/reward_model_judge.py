"""Reward-model judge: a sequence classifier scores each response; P(a better) is Bradley-Terry.

Each response is scored once, as the conversation ``prompt`` (user turn) + ``response``
(assistant turn), rendered with the tokenizer's chat template when it has one and
``"prompt\\n\\nresponse"`` otherwise. The reward is the classifier's single logit at the last real
token. ``P(a better) = sigmoid(r_a - r_b)``; a pointwise scorer has no position bias, so
``prob_ab == prob_ba == prob`` (consistent by construction).

Scores are batched with padding on either side (:func:`oaif.annotators.reward_scoring.sequence_rewards`, the
same scoring that :mod:`oaif.annotators.reward_model_training` trains with); the judge sets the config's
``pad_token_id`` when it lacks one. A response repeated within one call (same prompt) is scored once.

Faults never become labels: a conversation over ``max_length`` tokens fails the pair as
``"too_long"``; a non-finite reward fails it as ``"nan"``.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Sequence

import torch

from oaif.annotators.base import Judgment, PairRequest, checked, eval_mode, frozen
from oaif.errors import AnnotatorError, ModelError
from oaif.annotators.reward_scoring import conversation_ids, sequence_rewards, text_config, trained_with_chat_template
from oaif.stats import sigmoid

log = logging.getLogger("oaif.annotators")


class RewardModelJudge:
    """A pointwise judge backed by a transformers ``AutoModelForSequenceClassification`` (num_labels=1)."""

    def __init__(self, model, tokenizer, *, batch_size: int = 8, max_length: int = 1024,
                 use_chat_template: bool = True, padding_side: str = "right", name: str | None = None):
        num_labels = getattr(model.config, "num_labels", None)
        if num_labels != 1:
            raise AnnotatorError(f"a reward model judge needs a sequence classifier with num_labels=1, "
                                 f"this one has num_labels={num_labels}")
        if padding_side not in ("left", "right"):
            raise AnnotatorError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = max(1, int(batch_size))
        self.max_length = int(max_length)
        self.use_chat_template = use_chat_template
        self.padding_side = padding_side
        self.name = name or f"rm:{getattr(model.config, '_name_or_path', '') or 'reward_model'}"
        cfg = text_config(model)
        if cfg.pad_token_id is None:
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            cfg.pad_token_id = int(pad) if pad is not None else 0
            if model.config is not cfg:
                model.config.pad_token_id = cfg.pad_token_id
        #: Sequences scored (forward rows) since creation, after de-duplication.
        self.scored = 0

    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype: Any = "float32", device=None, *, cache_dir: str | None = None,
                        trust_remote_code: bool = False, **kw) -> "RewardModelJudge":
        """Load a reward model named in any form :func:`oaif.models.resolve.resolve_model_path` accepts.

        Raises :class:`ModelError` when the path does not resolve or load, and
        :class:`AnnotatorError` when it is not a sequence classifier with ``num_labels=1``.
        ``kw`` go to the constructor (``batch_size``, ``max_length``, ``use_chat_template``, ...).
        """
        from transformers import AutoModelForSequenceClassification

        from oaif.models.load import (_hub_note, _torch_dtype, describe_load_error, load_errors, load_model_config,
                                      load_tokenizer)

        path, config = load_model_config(name_or_path, cache_dir, trust_remote_code)
        archs = list(getattr(config, "architectures", None) or [])
        if archs and not any(a.endswith("ForSequenceClassification") for a in archs):
            raise AnnotatorError(f"{name_or_path} is not a reward model (architectures {archs}, expected a "
                                 f"...ForSequenceClassification with num_labels=1); train one with "
                                 f"oaif.annotators.reward_model_training.train_reward_model")
        if config.num_labels != 1:
            raise AnnotatorError(f"reward model {name_or_path} has num_labels={config.num_labels}; "
                                 f"a reward model judge needs num_labels=1 (one scalar score)")
        tokenizer = load_tokenizer(path, cache_dir, trust_remote_code)
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                path, dtype=_torch_dtype(dtype), local_files_only=True, trust_remote_code=trust_remote_code)
        except load_errors() as e:
            raise ModelError(f"cannot load reward model {name_or_path}: {describe_load_error(e)}"
                             f"{_hub_note(str(name_or_path), path)}") from e
        frozen(model, device)
        kw.setdefault("name", f"rm:{name_or_path}")
        if "use_chat_template" not in kw:  # score the way train_reward_model trained it
            kw["use_chat_template"] = trained_with_chat_template(path)
        return cls(model, tokenizer, **kw)

    # -- scoring ---------------------------------------------------------------------------
    def tokens(self, prompt, response: str) -> list[int]:
        return conversation_ids(self.tokenizer, prompt, response, self.use_chat_template)

    @torch.no_grad()
    def score_tokens(self, sequences: list[list[int]]) -> list[float]:
        """Rewards of token sequences, batched by similar length, in eval mode."""
        out = [float("nan")] * len(sequences)
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        with eval_mode(self.model):
            for start in range(0, len(order), self.batch_size):
                rows = order[start:start + self.batch_size]
                rewards = sequence_rewards(self.model, [sequences[i] for i in rows], self.padding_side).cpu().tolist()
                for i, r in zip(rows, rewards):
                    out[i] = float(r)
                self.scored += len(rows)
        return out

    def annotate(self, requests: Sequence[PairRequest]) -> list[Judgment]:
        if not requests:
            return []
        t0 = time.perf_counter()
        index: dict[tuple[str, str], int] = {}  # (prompt, response) -> unique sequence index
        seqs: list[list[int]] = []
        too_long: list[bool] = []
        for r in requests:
            for y in (r.a, r.b):
                key = (r.prompt, y)
                if key not in index:
                    index[key] = len(seqs)
                    ids = self.tokens(r.prompt, y)
                    seqs.append(ids)
                    too_long.append(len(ids) > self.max_length)
        todo = [i for i in range(len(seqs)) if not too_long[i]]
        rewards = [float("nan")] * len(seqs)
        if todo:
            for i, r in zip(todo, self.score_tokens([seqs[i] for i in todo])):
                rewards[i] = r
        latency = (time.perf_counter() - t0) / len(requests)
        judgments = []
        for r in requests:
            ia, ib = index[(r.prompt, r.a)], index[(r.prompt, r.b)]
            if too_long[ia] or too_long[ib]:
                log.warning("reward model input over %d tokens for prompt %s: pair masked", self.max_length, r.prompt_id)
                judgments.append(Judgment.failed("too_long", self.name, latency,
                                                 tokens_a=len(seqs[ia]), tokens_b=len(seqs[ib])))
                continue
            ra, rb = rewards[ia], rewards[ib]
            diff = ra - rb
            p = sigmoid(diff) if math.isfinite(diff) else float("nan")
            j = checked(p, self.name, latency, reward_a=ra, reward_b=rb)
            if j.ok:
                j.prob_ab = j.prob_ba = j.prob
            else:
                log.warning("reward model gave a non-finite reward for prompt %s: pair masked", r.prompt_id)
            judgments.append(j)
        return judgments
