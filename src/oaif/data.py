"""Prompt and preference data: loading, filtering, splitting and a resumable prompt stream.

:func:`training_prompts` is the one place where a run's records are chosen: loaded, filtered
(empty, too long) and split into training and held-out prompts. The trainer and
``oaif eval --run`` (:func:`oaif.evaluation.evaluate.held_out_prompts`) both call it, so they cannot drift.

Prompts come from JSONL (optionally gzipped), CSV, Parquet or a ``datasets`` ``save_to_disk``
directory. A prompt is plain text or a list of chat messages (``{"role": ..., "content": ...}``).
Rows that cannot be used for a benign reason (an empty prompt, a prompt that is too long, an
empty or identical response pair) are skipped and counted by reason; malformed input (a missing
file, a line that is not JSON, a missing field, a value of the wrong type) is a :class:`DataError`
with a one-line message that names the file, the line or row, and the problem.

:class:`PromptStream` is an endless, deterministic stream over the records: the record at a
given stream position is a pure function of ``(seed, position)``, so a checkpoint only needs the
position to continue exactly where a run stopped.

Nothing here imports torch or transformers; tokenization is passed in as a function.
pandas is not needed; pyarrow (Parquet) and ``datasets`` (``save_to_disk`` directories) are
imported only when such a file is read.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import os
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from dataclasses import field as _field
from pathlib import Path
from typing import Any, Generic, TypeVar

from oaif.errors import DataError

__all__ = [
    "FORMATS",
    "PreferenceRecord",
    "PreferenceSet",
    "PromptRecord",
    "PromptSet",
    "PromptStream",
    "TrainingPrompts",
    "detect_format",
    "filter_long",
    "load_hh_pairs",
    "load_preferences",
    "load_prompts",
    "messages_to_text",
    "parse_hh_dialogue",
    "save_preferences",
    "split_eval",
    "training_prompts",
]

#: Values accepted by ``load_prompts(format=...)`` (and ``data.format`` in the config).
FORMATS = ("auto", "jsonl", "csv", "parquet", "hf_disk")

Messages = list[dict[str, str]]
Prompt = str | Messages

_ROLE_NAMES = {"user": "User", "assistant": "Assistant", "system": "System"}


# --------------------------------------------------------------------------------------------
# records
# --------------------------------------------------------------------------------------------
def _check_prompt(prompt: Any) -> Prompt:
    """Return ``prompt`` as text or as a clean list of ``{"role", "content"}`` dicts.

    Raises :class:`DataError` (without location; callers add it) when ``prompt`` is neither.
    Keys other than ``role`` and ``content`` are dropped.
    """
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, (list, tuple)):
        messages: Messages = []
        for i, msg in enumerate(prompt):
            if not isinstance(msg, dict):
                raise DataError(f"message {i} is a {type(msg).__name__}, expected an object with role and content")
            role, content = msg.get("role"), msg.get("content")
            if not isinstance(role, str) or not role:
                raise DataError(f"message {i} has no text 'role' (got {role!r})")
            if not isinstance(content, str):
                raise DataError(f"message {i} ({role}) has no text 'content' (got {type(content).__name__})")
            messages.append({"role": role, "content": content})
        return messages
    raise DataError(f"expected text or a list of chat messages, got {type(prompt).__name__}")


def messages_to_text(prompt: Prompt) -> str:
    """Flatten a prompt to plain text (for judges, and for tokenizers without a chat template).

    Text is returned unchanged; messages become ``"User: ...\\n\\nAssistant: ...\\n\\nUser: ..."``
    in conversation order (so the last user turn comes last).
    """
    if isinstance(prompt, str):
        return prompt
    return "\n\n".join(f"{_ROLE_NAMES.get(m['role'], m['role'].capitalize())}: {m['content']}" for m in prompt)


def _is_empty(prompt: Prompt) -> bool:
    if isinstance(prompt, str):
        return not prompt.strip()
    return not any(m["content"].strip() for m in prompt)


@dataclass(frozen=True)
class PromptRecord:
    """One prompt: plain text or a list of chat messages (``{"role": str, "content": str}``)."""

    id: str
    prompt: Prompt

    def __post_init__(self) -> None:
        if not isinstance(self.id, str):
            raise DataError(f"prompt id must be a string, got {type(self.id).__name__}")
        object.__setattr__(self, "prompt", _check_prompt(self.prompt))

    @property
    def text(self) -> str:
        """The prompt as plain text (messages flattened as ``Role: content`` turns)."""
        return messages_to_text(self.prompt)

    @property
    def is_empty(self) -> bool:
        """True for whitespace-only text, no messages, or messages with only whitespace content."""
        return _is_empty(self.prompt)


@dataclass(frozen=True)
class PreferenceRecord:
    """A prompt with a preferred (``chosen``) and a dispreferred (``rejected``) response.

    ``prob`` is P(chosen is better) in [0, 1] when the source gives one, else ``None`` (a hard label).
    """

    id: str
    prompt: Prompt
    chosen: str
    rejected: str
    prob: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.id, str):
            raise DataError(f"preference id must be a string, got {type(self.id).__name__}")
        object.__setattr__(self, "prompt", _check_prompt(self.prompt))
        for name in ("chosen", "rejected"):
            if not isinstance(getattr(self, name), str):
                raise DataError(f"'{name}' must be text, got {type(getattr(self, name)).__name__}")
        if self.prob is not None:
            object.__setattr__(self, "prob", _check_prob(self.prob))

    @property
    def text(self) -> str:
        """The prompt as plain text (messages flattened as ``Role: content`` turns)."""
        return messages_to_text(self.prompt)


def _check_prob(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 <= float(value) <= 1.0):
        raise DataError(f"probability must be a number in [0, 1], got {value!r}")
    return float(value)


R = TypeVar("R")


@dataclass
class _LoadedSet(Generic[R]):
    records: list[R]
    skipped: Counter = _field(default_factory=Counter)  # reason -> rows skipped
    rows: int = 0  # data rows read from the source, kept or skipped

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[R]:
        return iter(self.records)


@dataclass
class PromptSet(_LoadedSet[PromptRecord]):
    """Result of :func:`load_prompts`: the usable ``records``, ``skipped`` counts by reason
    (``"empty"``; ``"too_long"`` once :func:`filter_long` is applied with ``skipped=``) and the
    number of ``rows`` read."""


@dataclass
class PreferenceSet(_LoadedSet[PreferenceRecord]):
    """Result of :func:`load_preferences` / :func:`load_hh_pairs`: usable ``records``, ``skipped``
    counts by reason (``"empty_prompt"``, ``"empty_response"``, ``"identical"``,
    ``"context_mismatch"``, ``"unparseable"``) and the number of ``rows`` read."""


# --------------------------------------------------------------------------------------------
# readers
# --------------------------------------------------------------------------------------------
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


def _columns_hint(columns: Iterable[str]) -> str:
    cols = list(columns)
    return ", ".join(cols) if cols else "none"


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


def _row_id(row: dict, index: int) -> str:
    """The row's ``id`` column as text if present and non-empty, else the 0-based row index."""
    value = row.get("id")
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
        return str(index)
    return str(value)


# --------------------------------------------------------------------------------------------
# prompts
# --------------------------------------------------------------------------------------------
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


class PromptStream(Generic[R]):
    """An endless, deterministic stream over ``records``, epoch after epoch.

    With ``shuffle`` each epoch is a fresh permutation drawn from ``(seed, epoch)``; without it,
    the records repeat in their given order. :attr:`position` counts records consumed so far;
    the record at any position is a pure function of ``(seed, position)``, so
    :meth:`state_dict` only needs the position to resume exactly.
    """

    def __init__(self, records: Sequence[R], seed: int = 0, shuffle: bool = True) -> None:
        if len(records) == 0:
            raise DataError("no records to stream (every row was empty, too long or skipped)")
        self.records: list[R] = list(records)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self._position = 0
        self._perm_epoch = -1
        self._perm: list[int] = []

    def __len__(self) -> int:
        return len(self.records)

    @property
    def position(self) -> int:
        """Number of records consumed so far (over all epochs)."""
        return self._position

    def _order(self, epoch: int) -> list[int]:
        if epoch != self._perm_epoch:
            perm = list(range(len(self.records)))
            if self.shuffle:
                random.Random(f"oaif-stream:{self.seed}:{epoch}").shuffle(perm)
            self._perm, self._perm_epoch = perm, epoch
        return self._perm

    def record_at(self, position: int) -> R:
        """The record served at stream ``position`` (does not move the stream)."""
        if position < 0:
            raise ValueError(f"position must be >= 0, got {position}")
        epoch, offset = divmod(position, len(self.records))
        return self.records[self._order(epoch)[offset]]

    def take(self, n: int) -> list[tuple[int, R]]:
        """The next ``n`` records, each with its stream position; advances :attr:`position` by ``n``."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        start = self._position
        out = [(pos, self.record_at(pos)) for pos in range(start, start + n)]
        self._position = start + n
        return out

    def take_for_rank(self, n_global: int, rank: int, world_size: int) -> list[tuple[int, R]]:
        """Take the next ``n_global`` records for all processes and return ``rank``'s contiguous slice.

        Every rank advances :attr:`position` by ``n_global``; the slices of ranks ``0..world_size-1``
        concatenated equal ``take(n_global)`` on a single process. When ``n_global`` is not a
        multiple of ``world_size`` the first ``n_global % world_size`` ranks get one extra record.
        """
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if n_global < 0:
            raise ValueError(f"n_global must be >= 0, got {n_global}")
        base, extra = divmod(n_global, world_size)
        lo = rank * base + min(rank, extra)
        hi = lo + base + (1 if rank < extra else 0)
        start = self._position
        out = [(pos, self.record_at(pos)) for pos in range(start + lo, start + hi)]
        self._position = start + n_global
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"position": self._position, "seed": self.seed, "shuffle": self.shuffle,
                "num_records": len(self.records)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position. The saved seed, shuffle flag and record count, when present, must
        match this stream: otherwise the same position would serve different records."""
        position = state.get("position")
        if isinstance(position, bool) or not isinstance(position, int) or position < 0:
            raise DataError(f"prompt stream state has no valid position (got {position!r})")
        mine = self.state_dict()
        for key in ("num_records", "seed", "shuffle"):
            if key in state and state[key] != mine[key]:
                raise DataError(f"cannot resume the prompt stream: the checkpoint has {key}={state[key]!r}, "
                                f"this run has {key}={mine[key]!r} (same data and train.seed needed)")
        self._position = position


# --------------------------------------------------------------------------------------------
# preferences
# --------------------------------------------------------------------------------------------
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
    :class:`DataError` naming the line. ``fields`` names the two response columns (``("a", "b")``
    reads unlabelled pairs: the first goes to ``chosen``, the second to ``rejected``).
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"preference file {p} is a directory, not a file" if p.is_dir()
                        else f"preference file not found: {p}")
    first, second = fields
    out = PreferenceSet(records=[])
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
        _add_preference(out, _row_id(obj, index), prompt, obj[first], obj[second], prob)
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


# --------------------------------------------------------------------------------------------
# Anthropic HH
# --------------------------------------------------------------------------------------------
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
