"""Reading rows, shared by the prompt, preference and HH loaders: the lines of a (gzipped) JSONL
file, a row's id, and the list of fields that an error about a missing one names."""

from __future__ import annotations

import gzip
import io
import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path

from oaif.errors import DataError


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig")
    return open(path, encoding="utf-8-sig")


def _is_text(obj) -> bool:
    """Whether every string in ``obj`` can be encoded as UTF-8 (so tokenized)."""
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)`` for every non-blank line of a (gzipped) JSONL file."""
    try:
        with _open_text(path) as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path} line {line_no}: not valid JSON ({e.msg})") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path} line {line_no}: expected a JSON object, got {type(obj).__name__}")
                if "\\ud" in line.lower() and not _is_text(obj):  # JSON can escape a lone UTF-16 surrogate
                    raise DataError(f"{path} line {line_no}: a lone UTF-16 surrogate (a \\ud800-\\udfff escape "
                                    "without its pair) is not text")
                yield line_no, obj
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    except (OSError, EOFError) as e:  # e.g. a truncated or non-gzip .gz file
        raise DataError(f"{path}: cannot read ({e})") from None


def _columns_hint(columns: Iterable[str]) -> str:
    cols = list(columns)
    return ", ".join(cols) if cols else "none"


def _row_id(row: dict, index: int) -> str:
    """The row's ``id`` column as text if present and non-empty, else the 0-based row index."""
    value = row.get("id")
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
        return str(index)
    return str(value)
