"""Prompts as the model reads them: chat messages, the chat template or plain text, and the
token that ends an assistant turn."""

from __future__ import annotations

import logging

from oaif.data.records import messages_to_text
from oaif.errors import DataError
from oaif.errors import one_line as _one_line

log = logging.getLogger("oaif.models")


def to_messages(prompt: str | list[dict], system_prompt: str | None = None) -> list[dict]:
    """Chat messages for a prompt: a plain string is one user message; ``system_prompt`` is
    prepended as a system message unless the messages already start with one."""
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, (list, tuple)):
        messages = []
        for m in prompt:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise DataError(f"a chat prompt must be a list of {{'role', 'content'}} messages, got {m!r}")
            messages.append({"role": str(m["role"]), "content": str(m["content"])})
        if not messages:
            raise DataError("a chat prompt has no messages")
    else:
        raise DataError(f"a prompt must be a string or a list of chat messages, got {type(prompt).__name__}")
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    return messages


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode_prompt(tokenizer, prompt: str | list[dict], use_chat_template: bool = True,
                  system_prompt: str | None = None) -> list[int]:
    """Token ids of a prompt, ready for generation.

    With a chat template (and ``use_chat_template``): the template with the generation prompt
    appended. Otherwise plain text with the special tokens the tokenizer adds by itself: a text
    prompt as it is (after the system prompt and a blank line); a conversation as
    :func:`oaif.data.records.messages_to_text` renders it, followed by ``"\n\nAssistant:"``.
    """
    messages = to_messages(prompt, system_prompt)
    if use_chat_template and has_chat_template(tokenizer):
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
    elif isinstance(prompt, str):
        ids = tokenizer("\n\n".join(m["content"] for m in messages))["input_ids"]
    else:
        ids = tokenizer(messages_to_text(messages) + "\n\nAssistant:")["input_ids"]
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if ids and isinstance(ids[0], (list, tuple)):
        ids = ids[0]
    return [int(i) for i in ids]


def end_of_turn_id(tokenizer, stop_ids: set[int]) -> int:
    """The token that ends an assistant turn: what offline responses get appended, so that they end
    as sampled ones do.

    With a chat template, the last of ``stop_ids`` (the ids sampling stops on) that the template
    writes after an assistant message (``<|im_end|>``, ``<|eot_id|>``, ...); otherwise, or if the
    template writes none of them, the tokenizer's EOS (when sampling stops on it) or the smallest stop id.
    """
    if has_chat_template(tokenizer):
        turn = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
        try:
            out = tokenizer.apply_chat_template(turn, tokenize=True, return_dict=True)
            ids = list(out["input_ids"] if hasattr(out, "keys") else out)
        except Exception as e:  # jinja raises its own errors for templates that reject this conversation
            log.warning("the chat template cannot render a user/assistant exchange (%s); offline responses "
                        "end with the tokenizer's EOS", _one_line(e))
            ids = []
        written = [int(i) for i in ids if int(i) in stop_ids]
        if written:
            return written[-1]
    eos = tokenizer.eos_token_id
    return eos if eos in stop_ids else min(stop_ids)
