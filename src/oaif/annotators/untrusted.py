"""Responses are data: keep untrusted text from posing as the judge's tags, turns or special tokens.

The prompt and the two responses a judge reads come from a dataset and from the policy being
trained, which learns whatever raises its reward. Three defences, one for each way text reaches a
judge:

* :func:`neutralize_tags` (every judge that reads a rubric): a tag that looks like one of the
  rubric's delimiters (``<response_2>``, ``</context>``) is rewritten as ``[response_2]``, so a
  response cannot close its own block and write outside it. Near misses are caught too: the
  match runs on a folded copy of the text (NFKC, case folded, zero-width and combining marks
  removed, Cyrillic/Greek/other look-alike letters mapped to Latin), and tags with attributes
  (``<response_2 id="x">``), spaces or other separators (``</response 2>``) or no closing
  bracket count.
* :func:`encode_data` and :func:`encode_slots` (in-process judges: the LLM judge and the reward
  model): the template is tokenized with its special tokens, the untrusted text separately with
  special-token parsing off, so *no* special or added token id can come from a response. The
  ids are checked, and a tokenizer that still produces one is overruled by cutting the text
  inside the token's string.
* :func:`neutralize_special_strings` (judges behind a server, which tokenizes text itself): the
  special-token strings of common chat templates (ChatML ``<|im_start|>``, Llama 3
  ``<|eot_id|>``, ``<|start_header_id|>``, Gemma ``<start_of_turn>``, ``</s>``, ``[INST]``,
  DeepSeek ``<｜User｜>``, ...) get an ordinary space after their opening bracket (``< |im_end|>``):
  visible, not zero-width, and no longer the token.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from typing import Iterable, Mapping

log = logging.getLogger("oaif.annotators")

# -- near-miss folding -------------------------------------------------------------------------

#: Letters and brackets that look like the ASCII ones in delimiter tags (NFKC covers fullwidth
#: and mathematical forms; these are the look-alikes it leaves alone).
_LOOKALIKES = {
    # Cyrillic
    "а": "a", "в": "b", "с": "c", "ԁ": "d", "е": "e", "ё": "e", "һ": "h", "і": "i", "ї": "i", "ј": "j",
    "к": "k", "ӏ": "l", "м": "m", "н": "h", "о": "o", "р": "p", "ԛ": "q", "г": "r", "ѕ": "s", "т": "t",
    "ц": "u", "ѵ": "v", "ԝ": "w", "х": "x", "у": "y", "з": "3", "ь": "b", "п": "n",
    # Greek
    "α": "a", "β": "b", "ϲ": "c", "ε": "e", "η": "n", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p",
    "τ": "t", "υ": "u", "χ": "x", "γ": "y", "ω": "w", "ѡ": "w",
    # Armenian, Latin extensions and others
    "օ": "o", "ս": "u", "ո": "n", "ɑ": "a", "ɡ": "g", "ı": "i", "ȷ": "j", "ʀ": "r", "ꜱ": "s", "ᴄ": "c",
    "ᴏ": "o", "ᴘ": "p", "ᴇ": "e", "ɴ": "n", "ᴛ": "t", "ʏ": "y", "ℓ": "l",
    # brackets, slashes, underscores
    "‹": "<", "›": ">", "〈": "<", "〉": ">", "⟨": "<", "⟩": ">", "❮": "<", "❯": ">", "ᐸ": "<", "ᐳ": ">",
    "˂": "<", "˃": ">", "∕": "/", "⁄": "/", "⧸": "/", "╱": "/", "‗": "_", "‐": "-", "‑": "-", "–": "-",
}
_DROP = {"Cf", "Mn", "Me"}  # zero-width and format characters, combining marks


def fold(text: str) -> tuple[str, list[int]]:
    """A folded copy of ``text`` for matching, and the index in ``text`` of each folded character."""
    if text.isascii():
        return text.lower(), list(range(len(text)))
    out: list[str] = []
    index: list[int] = []
    for i, ch in enumerate(text):
        for c in unicodedata.normalize("NFKC", ch):
            if unicodedata.category(c) in _DROP:
                continue
            for d in c.casefold():
                out.append(_LOOKALIKES.get(d, d))
                index.append(i)
    return "".join(out), index


# -- delimiter tags ----------------------------------------------------------------------------

_SEP = r"[\s_.\-]*"
_TAG_IN_TEMPLATE = re.compile(r"<\s*/?\s*([A-Za-z][\w-]*)")
_BASE_NAMES = ("context", "response_1", "response_2")


def tag_names(template: str) -> list[str]:
    """Delimiter tag names a rubric template uses (plus context, response_1, response_2)."""
    names = {n.lower() for n in _TAG_IN_TEMPLATE.findall(template)} | set(_BASE_NAMES)
    return sorted(names, key=len, reverse=True)


def _name_pattern(name: str) -> str:
    parts = [re.escape(p) for p in re.split(r"[\s_.\-]+", name) if p]
    return _SEP.join(parts)


_TAG_CACHE: dict[tuple[str, ...], re.Pattern] = {}


def _tag_regex(names: Iterable[str]) -> re.Pattern:
    key = tuple(names)
    if key not in _TAG_CACHE:
        alternatives = "|".join([_name_pattern(n) for n in key] + [r"response" + _SEP + r"\d+"])
        # <name ...attributes...>, <name>, < /name >, </name/>, or a bare <name / </name (no bracket)
        _TAG_CACHE[key] = re.compile(
            r"<\s*(?P<slash>/?)\s*(?P<name>" + alternatives + r")(?![\w])(?:\s[^<>\n]*>|\s*/?\s*>)?")
    return _TAG_CACHE[key]


def neutralize_tags(text: str, names: Iterable[str] = _BASE_NAMES) -> str:
    """Rewrite every tag that looks like one of the delimiter ``names`` as ``[name]`` / ``[/name]``."""
    if "<" not in text and text.isascii():
        return text
    folded, index = fold(text)
    matches = list(_tag_regex(names).finditer(folded))
    if not matches:
        return text
    out = text
    for m in reversed(matches):
        start, end = index[m.start()], index[m.end() - 1] + 1
        name = re.sub(r"[\s_.\-]+", "_", m.group("name"))
        out = out[:start] + f"[{m.group('slash')}{name}]" + out[end:]
    return out


# -- special-token strings (for servers) -------------------------------------------------------

_SPECIAL_STRING = re.compile(
    r"<(?=[|｜])"  # <|im_start|>, <|eot_id|>, <|start_header_id|>, <|endoftext|>, <｜User｜>, ...
    r"|<(?=/?(?:s|bos|eos|pad|unk|mask|sep|cls|start_of_turn|end_of_turn|start_of_image|end_of_image|think"
    r"|tool_call|tool_response)>)"  # </s>, <s>, Gemma <start_of_turn>, <end_of_turn>, Qwen <think>
    r"|<(?=</?SYS>>)"  # Llama 2 <<SYS>>
    r"|\[(?=/?(?:INST|SYSTEM_PROMPT|AVAILABLE_TOOLS|TOOL_CALLS|TOOL_RESULTS)\])",  # Mistral [INST], ...
    re.IGNORECASE)


def neutralize_special_strings(text: str) -> str:
    """Put a space after the opening bracket of every special-token string of common chat templates."""
    return _SPECIAL_STRING.sub(lambda m: m.group(0) + " ", text)


# -- tokenizing untrusted text -----------------------------------------------------------------


def special_ids(tokenizer) -> set[int]:
    """Ids that untrusted text must never produce: the special tokens and every added token."""
    ids = {int(i) for i in (getattr(tokenizer, "all_special_ids", None) or [])}
    ids.update(int(i) for i in (getattr(tokenizer, "added_tokens_decoder", None) or {}))
    return ids


def _added_strings(tokenizer, forbidden: set[int]) -> list[str]:
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    strings = {str(getattr(tok, "content", tok)) for i, tok in decoder.items() if int(i) in forbidden}
    strings.update(str(s) for s in (getattr(tokenizer, "all_special_tokens", None) or []))
    return sorted((s for s in strings if len(s) > 1), key=len, reverse=True)


def _encode_plain(tokenizer, text: str) -> list[int]:
    return [int(i) for i in tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]]


def encode_data(tokenizer, text: str, forbidden: set[int] | None = None) -> list[int]:
    """Token ids of untrusted ``text`` in which no id of ``forbidden`` (default: :func:`special_ids`) appears.

    Special-token parsing is off. A tokenizer that still turns part of the text into a forbidden
    token (an added token that is not marked special, say) is overruled: the text is cut inside
    every occurrence of such a token's string and the parts are tokenized apart. Any id that
    survives even that (a one-character added token) is dropped, with a warning.
    """
    if not text:
        return []
    forbidden = special_ids(tokenizer) if forbidden is None else forbidden
    ids = _encode_plain(tokenizer, text)
    if forbidden.isdisjoint(ids):
        return ids
    cuts = set()
    for s in _added_strings(tokenizer, forbidden):
        start = text.find(s)
        while start != -1:
            cuts.add(start + len(s) // 2)
            start = text.find(s, start + 1)
    bounds = [0, *sorted(cuts), len(text)]
    ids = [i for a, b in zip(bounds, bounds[1:]) if b > a for i in _encode_plain(tokenizer, text[a:b])]
    if not forbidden.isdisjoint(ids):
        log.warning("untrusted text still tokenized to special ids %s after cutting: dropped",
                    sorted(forbidden.intersection(ids))[:5])
        ids = [i for i in ids if i not in forbidden]
    return ids


_SLOT = re.compile("\ue000([A-Za-z_]\\w*)\ue001")


def slot(name: str) -> str:
    """A placeholder for the untrusted value ``name`` inside template text (private-use characters)."""
    return f"\ue000{name}\ue001"


def split_slots(text: str) -> list[tuple[str, bool]]:
    """``text`` cut at its slots: ``(template text, False)`` and ``(slot name, True)`` pieces, in order."""
    pieces: list[tuple[str, bool]] = []
    pos = 0
    for m in _SLOT.finditer(text):
        if m.start() > pos:
            pieces.append((text[pos:m.start()], False))
        pieces.append((m.group(1), True))
        pos = m.end()
    if pos < len(text):
        pieces.append((text[pos:], False))
    return pieces


class SlotEncoder:
    """Token ids of a template with slots, where no special or added token id comes from a slot's value.

    ``template`` is text holding :func:`slot` placeholders (a chat template rendered with slots as
    message contents, say). :meth:`encode` first tokenizes the assembled text in one piece, the
    way the tokenizer always would, and reads the character span of every token: when no special
    or added token overlaps a value, those ids are the answer (ordinary text tokenizes exactly as
    before). Otherwise a value holds (part of) a special token, and the text is tokenized in
    pieces instead: the template pieces with their special tokens, each value on its own with
    :func:`encode_data`. Tokenizers without character offsets always take the second way.
    """

    def __init__(self, tokenizer, template: str, add_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.pieces = split_slots(template)
        self.add_special_tokens = add_special_tokens
        self.forbidden = special_ids(tokenizer)
        self._fixed: dict[str, list[int]] | None = None  # template pieces' ids, made on the first piecewise encoding
        self._offsets = bool(getattr(tokenizer, "is_fast", False))
        #: How many encodings had to be made in pieces because a value held a special token.
        self.split_count = 0

    def names(self) -> list[str]:
        return [text for text, is_slot in self.pieces if is_slot]

    def encode(self, values: Mapping[str, str]) -> list[int]:
        if self._offsets:
            ids = self._whole(values)
            if ids is not None:
                return ids
        self.split_count += 1
        if self._fixed is None:
            self._fixed = {text: [int(i) for i in self.tokenizer(text, add_special_tokens=False)["input_ids"]]
                           for text, is_slot in self.pieces if not is_slot}
        before, after = _wrapping_ids(self.tokenizer) if self.add_special_tokens else ([], [])
        ids = list(before)
        for text, is_slot in self.pieces:
            ids.extend(encode_data(self.tokenizer, values[text], self.forbidden) if is_slot else self._fixed[text])
        ids.extend(after)
        return ids

    def _whole(self, values: Mapping[str, str]) -> list[int] | None:
        """The one-piece tokenization, or None when a special or added token overlaps a value."""
        parts, spans, pos = [], [], 0
        for text, is_slot in self.pieces:
            part = values[text] if is_slot else text
            if is_slot:
                spans.append((pos, pos + len(part)))
            parts.append(part)
            pos += len(part)
        enc = self.tokenizer("".join(parts), add_special_tokens=self.add_special_tokens, return_offsets_mapping=True)
        for token, (start, end) in zip(enc["input_ids"], enc["offset_mapping"]):
            if int(token) in self.forbidden and end > start and any(start < b and a < end for a, b in spans):
                return None
        return [int(i) for i in enc["input_ids"]]


def _wrapping_ids(tokenizer) -> tuple[list[int], list[int]]:
    """The ids a tokenizer adds before and after a text of its own (BOS, EOS, ...)."""
    probe = "probe"
    bare = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    for start in range(len(full) - len(bare) + 1):
        if full[start:start + len(bare)] == bare:
            return full[:start], full[start + len(bare):]
    return [], []
