"""A run's records: loaded, filtered (empty, too long) and split into training and held-out prompts.

:func:`training_prompts` is the one place where a run's records are chosen. The trainer and
``oaif eval --run`` (:func:`oaif.evaluation.responses.held_out_prompts`) both call it, so they
cannot drift.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from oaif.data.preferences import load_preferences
from oaif.data.prompts import load_prompts
from oaif.data.records import Prompt, PromptRecord, R, _LoadedSet
from oaif.errors import DataError


def filter_long(records: Sequence[R], count_tokens: Callable[[R], int], max_tokens: int,
                skipped: Counter | dict | None = None) -> tuple[list[R], int]:
    """Drop records whose ``count_tokens(record)`` exceeds ``max_tokens``.

    Returns ``(kept, n_skipped)``; when ``skipped`` (e.g. ``PromptSet.skipped``) is given,
    ``n_skipped`` is also added to ``skipped["too_long"]``.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    kept = [r for r in records if count_tokens(r) <= max_tokens]
    n = len(records) - len(kept)
    if skipped is not None and n:
        skipped["too_long"] = skipped.get("too_long", 0) + n
    return kept, n


def split_eval(records: Sequence[R], fraction: float, seed: int) -> tuple[list[R], list[R]]:
    """Hold out ``round(fraction * n)`` records (at least 1 when ``fraction > 0``, and never all).

    The choice depends only on ``(len(records), fraction, seed)``; both parts keep the input order
    and are disjoint. ``fraction == 0`` returns ``(all records, [])``.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"eval fraction must be in [0, 1), got {fraction}")
    n = len(records)
    if fraction == 0.0 or n < 2:
        return list(records), []
    n_eval = min(max(1, round(fraction * n)), n - 1)
    order = list(range(n))
    random.Random(f"oaif-split:{seed}").shuffle(order)
    held = set(order[:n_eval])
    train = [r for i, r in enumerate(records) if i not in held]
    evals = [r for i, r in enumerate(records) if i in held]
    return train, evals


@dataclass
class TrainingPrompts:
    """The records a run trains on and holds out (see :func:`training_prompts`)."""

    train: list  # PromptRecord (online) or PreferenceRecord (offline), in file order
    held_out: list[PromptRecord]
    prompt_tokens: dict[str, list[int]]  # record id -> templated prompt token ids, for every train record
    skipped: Counter  # reason -> rows left out (empty, too_long, and the preference file's reasons)
    usable: int  # records that passed the filters (what a held-out split was drawn from)


def training_prompts(data_cfg: Any, mode: str, seed: int, encode: Callable[[Prompt], list[int]]) -> TrainingPrompts:
    """Load, filter and split a run's records as ``data_cfg`` (a :class:`oaif.config.DataConfig`) says.

    ``mode="online"``: prompts from ``data.path`` (empty ones skipped), those longer than
    ``data.max_prompt_tokens`` after ``encode`` (the chat template) skipped as ``too_long``; the
    held-out prompts are ``data.eval_path``'s when set, else a ``data.eval_fraction`` split of the
    usable prompts (:func:`split_eval` with ``seed``). ``mode="offline"``: the preference file
    ``data.preference_path``, filtered by the same prompt length; nothing is held out.
    Raises :class:`DataError` when no record is left.
    """
    path = data_cfg.path if mode == "online" else data_cfg.preference_path
    loaded: _LoadedSet = (load_prompts(path, data_cfg.format, data_cfg.field) if mode == "online"
                          else load_preferences(path))
    skipped = Counter(loaded.skipped)
    tokens = {rec.id: encode(rec.prompt) for rec in loaded.records}
    usable, _ = filter_long(loaded.records, lambda rec: len(tokens[rec.id]), data_cfg.max_prompt_tokens, skipped)
    if mode == "offline":
        train, held_out = usable, []
    elif data_cfg.eval_path:
        train, held_out = usable, load_prompts(data_cfg.eval_path, data_cfg.format, data_cfg.field).records
    else:
        train, held_out = split_eval(usable, data_cfg.eval_fraction, seed)
    if not train:
        raise DataError(f"no usable records in {path} (skipped: {dict(skipped) or 'none'}"
                        f"{', the rest held out' if usable else ''})")
    return TrainingPrompts(train=train, held_out=held_out, prompt_tokens={r.id: tokens[r.id] for r in train},
                           skipped=skipped, usable=len(usable))
