"""What ``oaif annotate`` judges: pairs read from a file (labelled or not, HH transcripts), or pairs
sampled from a model on a prompt file."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Pair:
    """Two responses to one prompt. With human labels, ``a`` is the human-preferred one."""

    id: str
    prompt: Any  # text or chat messages
    a: str
    b: str


def _first_row(path: Path) -> dict | None:
    from oaif.data.rows import _iter_jsonl

    for _, obj in _iter_jsonl(path):
        return obj
    return None


def load_pairs(path: str | Path, labelled: bool = False):
    """Read pairs from JSONL (optionally .gz): ``prompt`` + ``chosen``/``rejected``, ``prompt`` +
    ``a``/``b`` (not with ``labelled``), or HH transcripts (``chosen``/``rejected`` without ``prompt``).

    Returns ``(pairs, rows, skipped)``: ``a`` is the ``chosen`` (or ``a``) response. Empty and
    identical pairs are skipped and counted by the loaders of :mod:`oaif.data.preferences` and
    :mod:`oaif.data.hh`.
    """
    from oaif.data.hh import load_hh_pairs
    from oaif.data.preferences import load_preferences
    from oaif.errors import DataError

    p = Path(path)
    if not p.exists():
        raise DataError(f"input file not found: {p}")
    if not p.is_file():
        raise DataError(f"input is not a file: {p}")
    first = _first_row(p)
    if first is None:
        raise DataError(f"{p}: no rows")
    if "chosen" in first and "rejected" in first:
        loaded = load_preferences(p) if "prompt" in first else load_hh_pairs(p)
    elif "a" in first and "b" in first and "prompt" in first:
        if labelled:
            raise DataError(f"{p}: --against-labels needs 'chosen' and 'rejected' (chosen = the human-preferred "
                            f"response); this file has unlabelled 'a'/'b'")
        loaded = load_preferences(p, fields=("a", "b"))  # a in chosen, b in rejected
    else:
        raise DataError(f"{p} line 1: expected 'prompt' with 'chosen'/'rejected' (or 'a'/'b'), or HH "
                        f"'chosen'/'rejected' transcripts (fields: {', '.join(first) or 'none'})")
    pairs = [Pair(r.id, r.prompt, r.chosen, r.rejected) for r in loaded.records]
    return pairs, loaded.rows, Counter(loaded.skipped)


# --------------------------------------------------------------------------------------------
# judging and statistics
# --------------------------------------------------------------------------------------------
def load_sample_prompts(args, skipped: Counter):
    """The prompts of ``args.input`` (first ``--limit``), with the row count; empty prompts counted."""
    from oaif.data.prompts import load_prompts

    prompts = load_prompts(args.input, field=args.prompt_field)
    skipped.update(prompts.skipped)
    records = prompts.records[: args.limit] if args.limit is not None else prompts.records
    return records, prompts.rows


def sample_pairs(args, records, model, tok, skipped: Counter) -> list[Pair]:
    """Sample ``--num-samples`` responses per prompt and pair them (0,1), (2,3), ...; identical
    pairs and prompts over ``--max-prompt-tokens`` are skipped and counted."""
    from tqdm import tqdm

    from oaif.data.split import filter_long
    from oaif.models.chat import encode_prompt
    from oaif.step.pairs import candidate_pairs
    from oaif.step.sampling import sample_responses

    k = args.num_samples
    tokens = {r.id: encode_prompt(tok, r.prompt) for r in records}
    records, _ = filter_long(records, lambda r: len(tokens[r.id]), args.max_prompt_tokens, skipped)
    pairs: list[Pair] = []
    step = max(1, args.batch_size)
    with tqdm(total=len(records), unit="prompt", desc="sample", disable=args.no_progress, mininterval=2.0) as bar:
        for start in range(0, len(records), step):
            chunk = records[start:start + step]
            responses, _ = sample_responses(model, tok, [tokens[r.id] for r in chunk],
                                            list(range(start, start + len(chunk))), k=k, seed=args.seed,
                                            temperature=args.temperature, top_p=args.top_p,
                                            max_new_tokens=args.max_new_tokens)
            for rec, rs in zip(chunk, responses):
                texts = [tok.decode(r, skip_special_tokens=True).strip() for r in rs]
                for ka, kb in candidate_pairs(k, "disjoint"):
                    if texts[ka] == texts[kb]:
                        skipped["identical"] += 1
                        continue
                    pid = rec.id if k == 2 else f"{rec.id}:{ka}-{kb}"
                    pairs.append(Pair(pid, rec.prompt, texts[ka], texts[kb]))
            bar.update(len(chunk))
    return pairs
