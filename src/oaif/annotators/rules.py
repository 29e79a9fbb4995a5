"""Rule judges for ``annotator.type=callable``: transparent preferences with a known answer.

Use them to check that training follows the annotator (a rule's preference is unambiguous), and
as clean-signal baselines next to a weak LLM judge. Name them as
``annotator.callable=oaif.annotators.rules:prefer_shorter``.
"""

from __future__ import annotations


def prefer_shorter(prompt: str, response: str) -> float:
    """Score: fewer words is better (P(a better) = sigmoid(words(b) - words(a)))."""
    return -float(len(response.split()))


def prefer_longer(prompt: str, response: str) -> float:
    """Score: more words is better."""
    return float(len(response.split()))


def prefer_no_digits(prompt: str, response: str) -> float:
    """Score: responses with fewer digit characters are better."""
    return -float(sum(ch.isdigit() for ch in response))
