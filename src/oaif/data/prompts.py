"""Prompt files: JSONL (optionally gzipped), CSV, Parquet or a ``datasets`` ``save_to_disk`` directory.

pandas is not needed; pyarrow (Parquet) and ``datasets`` (``save_to_disk`` directories) are
imported only when such a file is read.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from oaif.data.records import PromptRecord, PromptSet
from oaif.data.rows import _columns_hint, _iter_jsonl, _row_id
from oaif.errors import DataError

#: Values accepted by ``load_prompts(format=...)`` (and ``data.format`` in the config).
FORMATS = ("auto", "jsonl", "csv", "parquet", "hf_disk")


def detect_format(path: str | Path) -> str:
    """Guess the format of ``path`` from its extension, or from the files in a directory."""
    p = Path(path)
    if p.is_dir():
        if (p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file():
            return "hf_disk"
        raise DataError(f"{p} is a directory but not a datasets save_to_disk directory "
                        "(no dataset_info.json or dataset_dict.json)")
    name = p.name.lower()
    for suffixes, fmt in (((".jsonl", ".jsonl.gz", ".ndjson"), "jsonl"), ((".csv",), "csv"),
                          ((".parquet", ".pq"), "parquet")):
        if name.endswith(suffixes):
            return fmt
    raise DataError(f"cannot tell the format of {p} from its extension (expected .jsonl, .jsonl.gz, .csv, "
                    ".parquet or a datasets directory; or set data.format)")


def _rows_jsonl(path: Path, fld: str) -> Iterator[tuple[str, dict]]:
    for line_no, obj in _iter_jsonl(path):
        if fld not in obj:
            raise DataError(f"{path} line {line_no}: no field '{fld}' (fields: {_columns_hint(obj)})")
        yield f"line {line_no}", obj


def _rows_csv(path: Path, fld: str) -> Iterator[tuple[str, dict]]:
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            if fld not in columns:
                raise DataError(f"{path}: no column '{fld}' (columns: {_columns_hint(columns)})")
            for i, row in enumerate(reader):
                value = row.get(fld)
                row[fld] = _maybe_json_messages(value) if isinstance(value, str) else value
                yield f"row {i + 1}", row
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    except csv.Error as e:
        raise DataError(f"{path}: not valid CSV ({e})") from None


def _maybe_json_messages(value: str) -> Any:
    """CSV cells hold strings: accept a JSON list of ``{"role", "content"}`` objects as messages."""
    s = value.strip()
    if not (s.startswith("[") and s.endswith("]")):
        return value
    try:
        parsed = json.loads(s)
    except json.JSONDecodeError:
        return value
    if isinstance(parsed, list) and all(isinstance(m, dict) and "role" in m for m in parsed):
        return parsed
    return value


def _rows_parquet(path: Path, fld: str) -> Iterator[tuple[str, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading Parquet needs pyarrow: pip install 'oaif[data]'") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise DataError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if fld not in table.column_names:
        raise DataError(f"{path}: no column '{fld}' (columns: {_columns_hint(table.column_names)})")
    for i, row in enumerate(table.to_pylist()):
        yield f"row {i + 1}", row


def _rows_hf_disk(path: Path, fld: str) -> Iterator[tuple[str, dict]]:
    try:
        import datasets
    except ImportError:
        raise DataError("reading a save_to_disk directory needs datasets: pip install 'oaif[data]'") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises FileNotFoundError and others for foreign directories
        raise DataError(f"{path}: not a datasets save_to_disk directory ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds.keys())
        if "train" in ds:
            ds = ds["train"]
        elif len(splits) == 1:
            ds = ds[splits[0]]
        else:
            raise DataError(f"{path}: DatasetDict has no 'train' split and several splits "
                            f"({', '.join(splits)}); save the split to use on its own")
    if fld not in ds.column_names:
        raise DataError(f"{path}: no column '{fld}' (columns: {_columns_hint(ds.column_names)})")
    for i, row in enumerate(ds):
        yield f"row {i + 1}", row


_READERS: dict[str, Callable[[Path, str], Iterator[tuple[str, dict]]]] = {
    "jsonl": _rows_jsonl, "csv": _rows_csv, "parquet": _rows_parquet, "hf_disk": _rows_hf_disk,
}


def load_prompts(path: str | Path, format: str = "auto", field: str = "prompt") -> PromptSet:
    """Read prompts from ``path``.

    ``format`` is one of :data:`FORMATS`; ``auto`` decides from the extension (``.jsonl``,
    ``.jsonl.gz``, ``.ndjson``, ``.csv``, ``.parquet``) or, for a directory, from its
    ``dataset_info.json`` / ``dataset_dict.json`` (a DatasetDict's ``train`` split, or its only split).
    ``field`` holds plain text or a list of chat messages (in CSV, a JSON string of messages).
    Ids come from an ``id`` column when there is one, else the 0-based row index.

    Empty prompts are skipped and counted under ``skipped["empty"]``; a null value counts as empty.
    Raises :class:`DataError` for a missing file, an unknown format, a line that is not JSON,
    a missing field, a value that is neither text nor messages, or a duplicate id.
    """
    p = Path(path)
    fmt = format or "auto"
    if fmt not in FORMATS:
        raise DataError(f"unknown data format '{fmt}' (expected one of {', '.join(FORMATS)})")
    if not p.exists():
        raise DataError(f"prompt file not found: {p}")
    if fmt == "auto":
        fmt = detect_format(p)
    elif fmt == "hf_disk" and not p.is_dir():
        raise DataError(f"data.format=hf_disk needs a save_to_disk directory, but {p} is a file")
    elif fmt != "hf_disk" and p.is_dir():
        raise DataError(f"data.format={fmt} needs a file, but {p} is a directory")

    out = PromptSet(records=[])
    seen: dict[str, str] = {}
    for index, (where, row) in enumerate(_READERS[fmt](p, field)):
        out.rows += 1
        value = row.get(field)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            out.skipped["empty"] += 1
            continue
        rid = _row_id(row, index)
        try:
            rec = PromptRecord(id=rid, prompt=value)
        except DataError as e:
            raise DataError(f"{p} {where}: field '{field}': {e}") from None
        if rec.is_empty:
            out.skipped["empty"] += 1
            continue
        if rid in seen:
            raise DataError(f"{p} {where}: duplicate id '{rid}' (first at {seen[rid]}); ids must be unique")
        seen[rid] = where
        out.records.append(rec)
    return out
