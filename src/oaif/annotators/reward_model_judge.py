"""Reward-model judge: a sequence classifier scores each response; P(a better) is Bradley-Terry.

Each response is scored once, as the conversation ``prompt`` (user turn) + ``response``
(assistant turn), rendered with the tokenizer's chat template when it has one and
``"prompt\\n\\nresponse"`` otherwise. The reward is the classifier's single logit at the last real
token. ``P(a better) = sigmoid(r_a - r_b)``; a pointwise scorer has no position bias, so
``prob_ab == prob_ba == prob`` (consistent by construction).

Scores are batched with padding on either side. HF's sequence classifiers pool the logit of the
rightmost token that is not ``config.pad_token_id``; the judge sets that id when the config lacks
it, passes explicit position ids (so left padding changes nothing), and, in the rare batch where a
sequence ends with the pad id itself, pools with a pad id that no sequence ends with. A response
repeated within one call (same prompt) is scored once.

Faults never become labels: a conversation over ``max_length`` tokens fails the pair as
``"too_long"``; a non-finite reward fails it as ``"nan"``.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import time
from typing import Any, Sequence

import torch

from oaif.annotators.base import Judgment, PairRequest, checked
from oaif.errors import AnnotatorError, ModelError

log = logging.getLogger("oaif.annotators")

__all__ = ["RewardModelJudge", "conversation_text", "conversation_ids", "sequence_rewards", "sigmoid"]


# --------------------------------------------------------------------------- shared with training


def sigmoid(x: float) -> float:
    """Numerically stable logistic function (NaN stays NaN)."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def conversation_text(tokenizer, prompt, response: str, use_chat_template: bool = True) -> str:
    """The scored text: prompt as the user turn and response as the assistant turn.

    ``prompt`` is plain text (a list of chat messages is flattened the way judges see it, by
    :func:`oaif.data.messages_to_text`).
    """
    if not isinstance(prompt, str):
        from oaif.data import messages_to_text

        prompt = messages_to_text(prompt)
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return prompt + "\n\n" + response


def conversation_ids(tokenizer, prompt, response: str, use_chat_template: bool = True) -> list[int]:
    """Token ids of :func:`conversation_text` (a chat template brings its own special tokens).

    The prompt and the response are data: they are tokenized apart from the template with
    special-token parsing off (:class:`~oaif.annotators.untrusted.SlotEncoder`), so no special
    token id comes from them.
    """
    from oaif.annotators.untrusted import SlotEncoder, slot

    if not isinstance(prompt, str):
        from oaif.data import messages_to_text

        prompt = messages_to_text(prompt)
    templated = use_chat_template and bool(getattr(tokenizer, "chat_template", None))
    encoder = SlotEncoder(tokenizer, conversation_text(tokenizer, slot("prompt"), slot("response"), use_chat_template),
                          add_special_tokens=not templated)
    if sorted(encoder.names()) != ["prompt", "response"]:
        raise AnnotatorError("the reward model's chat template changes the message text, so the prompt and "
                             "response cannot be kept apart from it; set use_chat_template=False")
    return encoder.encode({"prompt": prompt, "response": response})


def _text_config(model):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _accepts_position_ids(model) -> bool:
    try:
        return "position_ids" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - exotic wrappers
        return False


@contextlib.contextmanager
def _pooling_pad_id(model, pad_id: int):
    cfg = _text_config(model)
    old = cfg.pad_token_id
    cfg.pad_token_id = pad_id
    try:
        yield
    finally:
        cfg.pad_token_id = old


def sequence_rewards(model, sequences: Sequence[Sequence[int]], padding_side: str = "right") -> torch.Tensor:
    """One forward pass over ``sequences`` (padded to one width); the ``(n,)`` float32 rewards.

    The reward of each row is the classifier's logit at its last real token, the same value as an
    unpadded forward of that row alone. Gradients flow when enabled (training uses this too).
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("sequence_rewards needs non-empty sequences")
    cfg = _text_config(model)
    pad = cfg.pad_token_id
    if pad is None:
        raise AnnotatorError("the reward model's config has no pad_token_id; set model.config.pad_token_id")
    # HF pools the rightmost token != pad_token_id: pad with an id that no sequence ends with.
    last_tokens = {int(s[-1]) for s in sequences}
    pool_pad = pad if pad not in last_tokens else next(i for i in range(len(last_tokens) + 1) if i not in last_tokens)
    device = next(model.parameters()).device
    n, width = len(sequences), max(len(s) for s in sequences)
    ids = torch.full((n, width), pool_pad, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for j, s in enumerate(sequences):
        sl = slice(width - len(s), width) if padding_side == "left" else slice(0, len(s))
        ids[j, sl] = torch.as_tensor(list(s), dtype=torch.long)
        mask[j, sl] = 1
    kwargs: dict[str, Any] = dict(input_ids=ids.to(device), attention_mask=mask.to(device))
    if _accepts_position_ids(model):
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0).to(device)
    ctx = _pooling_pad_id(model, pool_pad) if pool_pad != pad else contextlib.nullcontext()
    with ctx:
        logits = model(**kwargs, use_cache=False).logits
    if logits.ndim != 2 or logits.shape[-1] != 1:
        raise AnnotatorError(f"a reward model must output one logit per sequence, got logits of shape {tuple(logits.shape)}")
    return logits[:, 0].float()


def _trained_with_chat_template(path: str) -> bool:
    import json
    import os

    from oaif.reward_model import STATS_FILE

    try:
        with open(os.path.join(path, STATS_FILE)) as fh:
            return bool(json.load(fh).get("use_chat_template", True))
    except (OSError, ValueError, AttributeError):
        return True


# --------------------------------------------------------------------------- the judge


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
        cfg = _text_config(model)
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
        """Load a reward model named in any form :func:`oaif.models.resolve_model_path` accepts.

        Raises :class:`ModelError` when the path does not resolve or load, and
        :class:`AnnotatorError` when it is not a sequence classifier with ``num_labels=1``.
        ``kw`` go to the constructor (``batch_size``, ``max_length``, ``use_chat_template``, ...).
        """
        from transformers import AutoModelForSequenceClassification

        from oaif.models import _hub_note, _torch_dtype, describe_load_error, load_errors, load_model_config, load_tokenizer

        path, config = load_model_config(name_or_path, cache_dir, trust_remote_code)
        archs = list(getattr(config, "architectures", None) or [])
        if archs and not any(a.endswith("ForSequenceClassification") for a in archs):
            raise AnnotatorError(f"{name_or_path} is not a reward model (architectures {archs}, expected a "
                                 f"...ForSequenceClassification with num_labels=1); train one with "
                                 f"oaif.reward_model.train_reward_model")
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
        model.requires_grad_(False)
        model.eval()
        if device is not None:
            model.to(device)
        kw.setdefault("name", f"rm:{name_or_path}")
        if "use_chat_template" not in kw:  # score the way train_reward_model trained it
            kw["use_chat_template"] = _trained_with_chat_template(path)
        return cls(model, tokenizer, **kw)

    # -- scoring ---------------------------------------------------------------------------
    def tokens(self, prompt, response: str) -> list[int]:
        return conversation_ids(self.tokenizer, prompt, response, self.use_chat_template)

    @torch.no_grad()
    def score_tokens(self, sequences: list[list[int]]) -> list[float]:
        """Rewards of token sequences, batched by similar length."""
        out = [float("nan")] * len(sequences)
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(order), self.batch_size):
                rows = order[start:start + self.batch_size]
                rewards = sequence_rewards(self.model, [sequences[i] for i in rows], self.padding_side).cpu().tolist()
                for i, r in zip(rows, rewards):
                    out[i] = float(r)
                self.scored += len(rows)
        finally:
            self.model.train(was_training)
        return out

    def rewards(self, items: Sequence[tuple[str, str]]) -> list[float]:
        """Rewards of ``(prompt, response)`` items (no length limit; for diagnostics)."""
        return self.score_tokens([self.tokens(p, y) for p, y in items])

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
