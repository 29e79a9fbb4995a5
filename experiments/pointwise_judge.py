"""Prototype: a pointwise yes/no readout for a served judge, usable as oaif's callable annotator.

Each reply is judged on its own ("Is this reply good? yes or no"); its score is the log-odds of
the two label tokens at the answer position, ``logprob(yes) - logprob(no)``, read from the
server's ``top_logprobs`` exactly as oaif's OpenAI judge reads its pairwise labels (entries whose
stripped, lower-cased text equals a label are summed). oaif's callable judge turns two scores into
P(a better) = sigmoid(score(a) - score(b)) (Bradley-Terry), so there is no position to favour and
both-order consistency is 1 by construction. Two requests per pair, like the pairwise judge in
both orders, but each holds one reply, and the second reuses the server's cached prefix (system
prompt, rubric and conversation).

Run it through `oaif annotate` (the server, model and rubric come from the environment):

    OAIF_POINTWISE_URL=http://127.0.0.1:8080/v1 OAIF_POINTWISE_MODEL=judge \\
    OAIF_POINTWISE_RUBRIC=experiments/judge_rubrics/pointwise_harmless.yaml PYTHONPATH=experiments \\
    oaif annotate pairs.jsonl --against-labels --set type=callable --set callable=pointwise_judge:score

A pointwise rubric is YAML with ``template`` (variables ``{context}`` and ``{response}``),
``labels`` (the yes and no words, single tokens), optional ``system`` and ``name``. A reply whose
answer position lists neither label raises, and oaif masks the pair as ``callable_error``. If it
proves better than the pairwise readout, the change to oaif is a ``readout: pointwise`` option of
the OpenAI judge (see docs/RESULTS.md, section 0).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from oaif.annotators.rubrics import sanitize


@dataclass(frozen=True)
class PointwiseRubric:
    name: str
    template: str
    labels: tuple[str, str]
    system: str | None = None

    def render(self, context: str, response: str) -> str:
        return self.template.format(context=sanitize(context), response=sanitize(response))


def load_pointwise_rubric(path: str | Path) -> PointwiseRubric:
    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict) or "template" not in data:
        raise ValueError(f"pointwise rubric {path}: needs a 'template' key")
    labels = tuple(str(x) for x in data.get("labels", ("yes", "no")))
    if len(labels) != 2 or labels[0].lower() == labels[1].lower():
        raise ValueError(f"pointwise rubric {path}: labels must be two different words, got {labels!r}")
    rubric = PointwiseRubric(str(data.get("name", Path(path).stem)), str(data["template"]), labels, data.get("system"))
    rubric.render("c", "r")  # fails here, naming the file, if the template has other variables
    return rubric


def label_log_odds(top_logprobs: list[tuple[str, float]], labels: tuple[str, str]) -> float:
    """``logprob(label 0) - logprob(label 1)`` from one position's alternatives.

    A label that is not listed is given the smallest listed logprob (an upper bound on its
    value, so the result is pulled towards 0); neither listed raises ``ValueError``.
    """
    def total(label: str) -> float | None:
        vals = [lp for tok, lp in top_logprobs if tok.strip().lower() == label.lower()]
        if not vals:
            return None
        m = max(vals)
        return m + math.log(sum(math.exp(v - m) for v in vals))

    yes, no = total(labels[0]), total(labels[1])
    if yes is None and no is None:
        raise ValueError(f"neither {labels[0]!r} nor {labels[1]!r} among the top logprobs "
                         f"{[t for t, _ in top_logprobs][:8]}")
    floor = min(lp for _, lp in top_logprobs)
    return (yes if yes is not None else floor) - (no if no is not None else floor)


class PointwiseClient:
    """Asks one served model, through the OpenAI SDK, for the label log-odds of single replies."""

    def __init__(self, base_url: str, model: str, rubric: PointwiseRubric, top_logprobs: int = 20,
                 timeout: float = 600.0):
        from openai import OpenAI

        self.client = OpenAI(base_url=base_url, api_key=os.environ.get("OPENAI_API_KEY", "not-needed"),
                             timeout=timeout, max_retries=2)
        self.model, self.rubric, self.top_logprobs = model, rubric, top_logprobs

    def score(self, context: str, response: str) -> float:
        messages = ([{"role": "system", "content": self.rubric.system}] if self.rubric.system else [])
        messages.append({"role": "user", "content": self.rubric.render(context, response)})
        out = self.client.chat.completions.create(model=self.model, messages=messages, max_tokens=1, temperature=0,
                                                  logprobs=True, top_logprobs=self.top_logprobs)
        content = out.choices[0].logprobs.content
        if not content:
            raise ValueError("the server returned no logprobs")
        entry = content[0]
        listed = [(t.token, float(t.logprob)) for t in entry.top_logprobs]
        if entry.token not in {t for t, _ in listed}:
            listed.append((entry.token, float(entry.logprob)))
        if not all(math.isfinite(lp) for _, lp in listed):
            raise ValueError("non-finite logprob")
        return label_log_odds(listed, self.rubric.labels)


@functools.lru_cache(maxsize=1)
def _client() -> PointwiseClient:
    missing = [k for k in ("OAIF_POINTWISE_URL", "OAIF_POINTWISE_MODEL", "OAIF_POINTWISE_RUBRIC") if not os.environ.get(k)]
    if missing:
        raise RuntimeError(f"pointwise_judge: set {', '.join(missing)}")
    return PointwiseClient(os.environ["OAIF_POINTWISE_URL"], os.environ["OAIF_POINTWISE_MODEL"],
                           load_pointwise_rubric(os.environ["OAIF_POINTWISE_RUBRIC"]))


def score(prompt: str, response: str) -> float:
    """oaif callable (pointwise form): the judge's yes/no log-odds for ``response``."""
    return _client().score(prompt, response)
