"""First user turns of Anthropic HH harmless-base test dialogues as prompts, and which dialogues each
experiment may take them from, so that held-out prompts never meet training or judge-signal prompts.

    dialogues    0-399   data/prompts/hh_harmless_*.jsonl (rm_vs_llm.py), 400-1599 its reward-model pairs;
                         evidence_rm.py (claim 3): training prompts 0-399, reward models on the pairs of
                         501-1304, measured on the first 380 pairs (0-380), 128 held-out prompts of 1305-1599
    dialogues 1600-1999  evidence.py's 48 held-out prompts (``evidence_heldout``); judge_signal.py the rest
    dialogues 2000-      judge_signal.py (taken first)
"""

from __future__ import annotations

import functools
import gzip
import json
import random
from pathlib import Path

HH = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "hh_harmless_test.jsonl.gz"
HELD = (1600, 2000)  # evidence.py's held-out prompts are drawn from these
HELD_N = 48
SIGNAL_FIRST = 2000  # judge_signal.py takes these first, then what evidence.py leaves of HELD


@functools.lru_cache(maxsize=2)
def _lines(path: Path) -> tuple[str, ...]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return tuple(line for line in f if line.strip())


def first_turns(lo: int, hi: int | None = None, path: Path = HH) -> list[dict]:
    """``{"id": "hh-harmless-test-<i>", "prompt": <first user turn>}`` of dialogues ``lo <= i < hi``."""
    from oaif.data.hh import parse_hh_dialogue

    lines = _lines(path)
    return [{"id": f"hh-harmless-test-{i}", "prompt": parse_hh_dialogue(json.loads(lines[i])["chosen"])[0][0]["content"]}
            for i in range(lo, len(lines) if hi is None else min(hi, len(lines)))]


def shuffled(rows: list[dict], key: str) -> list[dict]:
    rows = list(rows)
    random.Random(key).shuffle(rows)
    return rows


def evidence_heldout(path: Path = HH) -> list[dict]:
    """evidence.py's held-out HH prompts: HELD_N of dialogues HELD, in a fixed draw."""
    return shuffled(first_turns(*HELD, path=path), "evidence-heldout")[:HELD_N]


def signal_pool(seed: int, path: Path = HH) -> list[dict]:
    """judge_signal.py's HH prompts in the order it takes them: dialogues SIGNAL_FIRST and up, then
    those of HELD that evidence.py does not hold out (each part in its own fixed draw)."""
    held = {r["id"] for r in evidence_heldout(path)}
    rest = [r for r in first_turns(*HELD, path=path) if r["id"] not in held]
    return shuffled(first_turns(SIGNAL_FIRST, path=path), f"judge-signal-hh:{seed}") + \
        shuffled(rest, f"judge-signal-hh-rest:{seed}")
