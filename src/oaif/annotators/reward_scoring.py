"""How a reward model scores a response: shared by its training and by the reward-model judge.

A response is scored as the conversation ``prompt`` (user turn) + ``response`` (assistant turn),
rendered with the tokenizer's chat template when it has one and ``"prompt\\n\\nresponse"``
otherwise (:func:`conversation_ids`). The reward is the sequence classifier's single logit at the
last real token (:func:`sequence_rewards`). HF's sequence classifiers pool the logit of the
rightmost token that is not ``config.pad_token_id``; :func:`sequence_rewards` passes explicit
position ids (so left padding changes nothing) and, in the rare batch where a sequence ends with
the pad id itself, pools with a pad id that no sequence ends with.

:mod:`oaif.annotators.reward_model_training` writes :data:`STATS_FILE` next to the weights; the judge reads
from it whether to use the chat template (:func:`trained_with_chat_template`).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Sequence

import torch

from oaif.errors import AnnotatorError

STATS_FILE = "oaif_reward_model.json"


def conversation_text(tokenizer, prompt, response: str, use_chat_template: bool = True) -> str:
    """The scored text: prompt as the user turn and response as the assistant turn.

    ``prompt`` is plain text (a list of chat messages is flattened the way judges see it, by
    :func:`oaif.data.records.messages_to_text`).
    """
    if not isinstance(prompt, str):
        from oaif.data.records import messages_to_text

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
        from oaif.data.records import messages_to_text

        prompt = messages_to_text(prompt)
    templated = use_chat_template and bool(getattr(tokenizer, "chat_template", None))
    encoder = SlotEncoder(tokenizer, conversation_text(tokenizer, slot("prompt"), slot("response"), use_chat_template),
                          add_special_tokens=not templated)
    if sorted(encoder.names()) != ["prompt", "response"]:
        raise AnnotatorError("the reward model's chat template changes the message text, so the prompt and "
                             "response cannot be kept apart from it; set use_chat_template=False")
    return encoder.encode({"prompt": prompt, "response": response})


def text_config(model):
    """The (text) config that holds ``pad_token_id``."""
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _accepts_position_ids(model) -> bool:
    try:
        return "position_ids" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - exotic wrappers
        return False


@contextlib.contextmanager
def _pooling_pad_id(model, pad_id: int):
    cfg = text_config(model)
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
    cfg = text_config(model)
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


def trained_with_chat_template(path: str) -> bool:
    """Whether the reward model at ``path`` was trained on chat-templated text (its
    :data:`STATS_FILE`; ``True`` when it has none, e.g. a reward model from elsewhere)."""
    import json
    import os

    try:
        with open(os.path.join(path, STATS_FILE)) as fh:
            return bool(json.load(fh).get("use_chat_template", True))
    except (OSError, ValueError, AttributeError):
        return True
