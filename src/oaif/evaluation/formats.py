"""How evaluations and ``oaif annotate`` write numbers and files: the number formats of the
report and the printed summaries, a model name shortened for a label, and atomic text/JSON writes."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence


def fmt(x: Any, digits: int = 3) -> str:
    """A number as the report writes it (``n/a`` for None); win rates use 3 decimals."""
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if math.isnan(x):
            return "n/a"
        return f"{x:.{digits}f}"
    return str(x)


def fmt_ci(ci: Sequence[float] | None, digits: int = 3) -> str:
    return f"[{fmt(ci[0], digits)}, {fmt(ci[1], digits)}]" if ci else "n/a"


def fmt_counts(c: dict) -> str:
    """Counts by reason as ``reason n, reason n`` (``none`` when empty)."""
    return ", ".join(f"{k} {v}" for k, v in c.items()) if c else "none"


def write_text(path: str | Path, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` through a temporary file renamed into place (parents created)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(p)


def write_json(path: str | Path, data: dict) -> None:
    """Write ``data`` as indented UTF-8 JSON, atomically (:func:`write_text`)."""
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def short_model(model: str, limit: int = 40) -> str:
    """A model path shortened for a plot title (its last two path parts, cut at ``limit``)."""
    parts = Path(model).parts
    name = "/".join(parts[-2:]) if len(parts) > 1 else model
    return name if len(name) <= limit else "..." + name[-(limit - 3):]
