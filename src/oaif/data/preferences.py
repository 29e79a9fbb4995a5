"""Preference files (offline training, ``oaif annotate``): JSONL pairs loaded and saved."""

from __future__ import annotations

import gzip
import io
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from oaif.data.records import PreferenceRecord, PreferenceSet, Prompt, _check_prob, _check_prompt, _is_empty
from oaif.data.rows import _columns_hint, _iter_jsonl, _row_id
from oaif.errors import DataError


def _add_preference(out: PreferenceSet, rid: str, prompt: Prompt, chosen: str, rejected: str,
                    prob: float | None) -> None:
    rec = PreferenceRecord(id=rid, prompt=prompt, chosen=chosen, rejected=rejected, prob=prob)
    if _is_empty(rec.prompt):
        out.skipped["empty_prompt"] += 1
    elif not chosen.strip() or not rejected.strip():
        out.skipped["empty_response"] += 1
    elif chosen.strip() == rejected.strip():
        out.skipped["identical"] += 1
    else:
        out.records.append(rec)


def load_preferences(path: str | Path, fields: tuple[str, str] = ("chosen", "rejected")) -> PreferenceSet:
    """Read an offline preference file: JSONL (optionally ``.gz``) with ``prompt`` (text or
    messages), ``chosen``, ``rejected``, optional ``prob`` or ``probability`` (P(chosen better)
    in [0, 1]) and optional ``id`` (default: the 0-based row index).

    Skipped and counted: empty prompt (``empty_prompt``), empty chosen or rejected
    (``empty_response``), chosen equal to rejected (``identical``). Anything malformed is a
    :class:`DataError` naming the line, and so is an id that repeats (an explicit id equal to another
    row's, or to another row's default index id): offline pairs find their prompt by id. ``fields`` names the two response columns (``("a", "b")``
    reads unlabelled pairs: the first goes to ``chosen``, the second to ``rejected``).
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"preference file {p} is a directory, not a file" if p.is_dir()
                        else f"preference file not found: {p}")
    first, second = fields
    out = PreferenceSet(records=[])
    seen: dict[str, int] = {}
    for index, (line_no, obj) in enumerate(_iter_jsonl(p)):
        out.rows += 1
        where = f"{p} line {line_no}"
        missing = [k for k in ("prompt", first, second) if k not in obj]
        if missing:
            raise DataError(f"{where}: no field {', '.join(repr(m) for m in missing)} (fields: {_columns_hint(obj)})")
        for k in (first, second):
            if not isinstance(obj[k], str):
                raise DataError(f"{where}: '{k}' must be text, got {type(obj[k]).__name__}")
        if "prob" in obj and "probability" in obj:
            raise DataError(f"{where}: give either 'prob' or 'probability', not both")
        key = "prob" if "prob" in obj else "probability"
        try:
            prob = None if obj.get(key) is None else _check_prob(obj[key])
        except DataError as e:
            raise DataError(f"{where}: '{key}': {e}") from None
        try:
            prompt = _check_prompt(obj["prompt"])
        except DataError as e:
            raise DataError(f"{where}: 'prompt': {e}") from None
        rid = _row_id(obj, index)
        if rid in seen:
            raise DataError(f"{where}: duplicate id '{rid}' (first at line {seen[rid]}); ids must be unique")
        seen[rid] = line_no
        _add_preference(out, rid, prompt, obj[first], obj[second], prob)
    return out


def save_preferences(path: str | Path, records: Iterable[PreferenceRecord]) -> int:
    """Write ``records`` as JSONL (gzipped when ``path`` ends in ``.gz``) that :func:`load_preferences`
    reads back: ``id``, ``prompt``, ``chosen``, ``rejected`` and ``prob`` when it is set.

    The file is written to a temporary name and moved into place. Returns the number of records.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    n = 0
    opener = (lambda: io.TextIOWrapper(gzip.open(tmp, "wb"), encoding="utf-8")) if p.name.endswith(".gz") \
        else (lambda: open(tmp, "w", encoding="utf-8"))
    with opener() as f:
        for rec in records:
            row: dict[str, Any] = {"id": rec.id, "prompt": rec.prompt, "chosen": rec.chosen, "rejected": rec.rejected}
            if rec.prob is not None:
                row["prob"] = rec.prob
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, p)
    return n
