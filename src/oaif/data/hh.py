"""Anthropic HH-RLHF transcripts parsed into chat messages and preference pairs."""

from __future__ import annotations

import re
from pathlib import Path

from oaif.data.preferences import _add_preference
from oaif.data.records import Messages, PreferenceSet
from oaif.data.rows import _columns_hint, _iter_jsonl, _row_id
from oaif.errors import DataError


_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def parse_hh_dialogue(text: str) -> tuple[Messages, str]:
    """Split an Anthropic HH transcript (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``).

    Returns ``(context, response)``: every turn but the final assistant one as chat messages
    (roles ``user`` / ``assistant``, content stripped), and the final assistant turn's text, stripped.
    Raises :class:`DataError` when there are no turns or the last turn is not the assistant's.
    """
    matches = list(_HH_TURN.finditer(text))
    if not matches:
        raise DataError("HH dialogue has no 'Human:' or 'Assistant:' turns")
    if text[: matches[0].start()].strip():
        raise DataError("HH dialogue has text before its first turn")
    turns = []
    for m, nxt in zip(matches, matches[1:] + [None]):
        end = nxt.start() if nxt is not None else len(text)
        turns.append((_HH_ROLES[m.group(1)], text[m.end():end].strip()))
    if turns[-1][0] != "assistant":
        raise DataError("HH dialogue does not end with an Assistant turn")
    context = [{"role": role, "content": content} for role, content in turns[:-1]]
    return context, turns[-1][1]


def load_hh_pairs(path: str | Path) -> PreferenceSet:
    """Read Anthropic HH-RLHF pairs (JSONL, optionally ``.gz``, fields ``chosen`` / ``rejected``).

    Each record's prompt is the shared context as chat messages; chosen / rejected are the final
    assistant turns; ``prob`` is ``None``. Skipped and counted: contexts that differ
    (``context_mismatch``), transcripts that do not parse (``unparseable``), an empty context
    (``empty_prompt``), an empty response (``empty_response``) and identical responses (``identical``).
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"HH file {p} is a directory, not a file" if p.is_dir() else f"HH file not found: {p}")
    out = PreferenceSet(records=[])
    for index, (line_no, obj) in enumerate(_iter_jsonl(p)):
        out.rows += 1
        for k in ("chosen", "rejected"):
            if not isinstance(obj.get(k), str):
                raise DataError(f"{p} line {line_no}: '{k}' must be text (fields: {_columns_hint(obj)})")
        try:
            ctx_c, chosen = parse_hh_dialogue(obj["chosen"])
            ctx_r, rejected = parse_hh_dialogue(obj["rejected"])
        except DataError:
            out.skipped["unparseable"] += 1
            continue
        if ctx_c != ctx_r:
            out.skipped["context_mismatch"] += 1
            continue
        _add_preference(out, _row_id(obj, index), ctx_c, chosen, rejected, None)
    return out
