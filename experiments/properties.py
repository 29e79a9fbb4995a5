"""Properties of a reply that a rule can measure, and rule judges that prefer them (issue 20).

Each property is a yes/no function of the reply text alone (the prompt is not read):

    one_sentence    a single sentence: one line, and no sentence end (. ! ? followed by a space) before the last
                    words; an abbreviation such as "e.g. this" counts as a sentence end
    numbered_list   at least two lines that start with a number followed by "." or ")" (1. ... 2. ...)
    no_question     no question mark anywhere (no question back to the user)
    short           at most ``short_words`` words (split on white space); experiments/judge_signal.py
                    fixes the bound from its sampled replies before judging and records it

``prefer_<property>`` are oaif callable judges (``annotator.type=callable``,
``annotator.callable=properties:prefer_numbered_list`` with experiments/ on PYTHONPATH): score 10
when the reply has the property, 0 when not, so P(a better) = sigmoid(10) (about 0.99995) when
exactly one of the two has it and 1/2 when both or neither do. ``prefer_short`` reads its bound
from ``OAIF_SHORT_WORDS`` (default ``SHORT_WORDS``).

``sample_order`` is not a preference: it scores a reply by a hash of its text, so two different
replies never tie. judge_signal.py labels its sampled pairs with it only so that ``oaif annotate
--sample-from`` writes every sampled reply (a tie would drop the pair).
"""

from __future__ import annotations

import os
import re
import zlib
from typing import Callable

SHORT_WORDS = 60  # prefer_short's default bound (judge_signal.py's table records the bound it measured with)

_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*\s+(?=\S)")
_NUMBERED_LINE = re.compile(r"^\s*\d{1,3}[.)]\s+\S", re.MULTILINE)


def words(text: str) -> int:
    return len(text.split())


def one_sentence(text: str) -> bool:
    t = text.strip()
    return bool(t) and "\n" not in t and not _SENTENCE_END.search(t)


def numbered_list(text: str) -> bool:
    return len(_NUMBERED_LINE.findall(text)) >= 2


def no_question(text: str) -> bool:
    return "?" not in text


def short(text: str, short_words: int = SHORT_WORDS) -> bool:
    return words(text) <= short_words


def measures(short_words: int) -> dict[str, Callable[[str], bool]]:
    """Every property as a function of the reply text (``short`` with the bound ``short_words``)."""
    return {"one_sentence": one_sentence, "numbered_list": numbered_list, "no_question": no_question,
            "short": lambda text: short(text, short_words)}


PROPERTIES = tuple(measures(SHORT_WORDS))


def _score(holds: bool) -> float:
    return 10.0 if holds else 0.0


def prefer_one_sentence(prompt: str, response: str) -> float:
    return _score(one_sentence(response))


def prefer_numbered_list(prompt: str, response: str) -> float:
    return _score(numbered_list(response))


def prefer_no_question(prompt: str, response: str) -> float:
    return _score(no_question(response))


def prefer_short(prompt: str, response: str) -> float:
    return _score(short(response, int(os.environ.get("OAIF_SHORT_WORDS", SHORT_WORDS))))


def sample_order(prompt: str, response: str) -> float:
    """A score in [0, 100) from the text's CRC-32: no preference, and no ties between different texts."""
    return zlib.crc32(response.encode("utf-8")) / 2**32 * 100.0
