"""Build the shipped prompt files in data/prompts/ from the source data sets.

    python scripts/build_demo_prompts.py [--source-dir ../shared/data] [--out-dir data/prompts]

Writes, deterministically (same input -> byte-identical output):

* ``demo_prompts.jsonl``: Self-Instruct's 252 user-oriented instructions
  (``self_instruct_user_oriented.jsonl``); prompt = instruction, plus a blank line and the first
  instance's input when it is non-empty; only prompts of at most ``--max-chars`` characters.
* ``hh_harmless_prompts.jsonl``: the contexts (every turn before the final assistant reply) of the
  first ``--hh-count`` dialogues of Anthropic HH-RLHF's harmless-base test split
  (``hh_harmless_test.jsonl.gz``, the ``chosen`` transcript), as chat messages.

Both files have the fields ``id`` and ``prompt``. The licenses are copied next to them.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
from pathlib import Path

from oaif.data.hh import load_hh_pairs, parse_hh_dialogue
from oaif.data.preferences import save_preferences

REPO = Path(__file__).resolve().parents[1]


def build_self_instruct(src: Path, max_chars: int) -> list[dict]:
    rows = []
    with open(src, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            task = json.loads(line)
            prompt = task["instruction"].strip()
            instances = task.get("instances") or []
            first_input = (instances[0].get("input") or "").strip() if instances else ""
            if first_input:
                prompt += "\n\n" + first_input
            if len(prompt) <= max_chars:
                rows.append({"id": task["id"], "prompt": prompt})
    return rows


def build_hh(src: Path, count: int) -> list[dict]:
    rows = []
    with gzip.open(src, "rt", encoding="utf-8") as f:
        for index, line in enumerate(f):
            if len(rows) >= count:
                break
            context, _ = parse_hh_dialogue(json.loads(line)["chosen"])
            rows.append({"id": f"hh-harmless-test-{index}", "prompt": context})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source-dir", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--out-dir", type=Path, default=REPO / "data" / "prompts")
    ap.add_argument("--max-chars", type=int, default=600)
    ap.add_argument("--hh-count", type=int, default=200)
    args = ap.parse_args()

    src, out = args.source_dir, args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    demo = build_self_instruct(src / "self_instruct_user_oriented.jsonl", args.max_chars)
    write_jsonl(out / "demo_prompts.jsonl", demo)
    hh = build_hh(src / "hh_harmless_test.jsonl.gz", args.hh_count)
    write_jsonl(out / "hh_harmless_prompts.jsonl", hh)
    # human-labelled pairs from the dialogues after the prompt set, for offline mode
    pairs = load_hh_pairs(src / "hh_harmless_test.jsonl.gz").records[args.hh_count:2 * args.hh_count]
    save_preferences(out / "hh_harmless_preferences.jsonl", pairs)
    for name in ("LICENSE.self-instruct", "LICENSE.hh-rlhf"):
        shutil.copyfile(src / name, out / name)
    print(f"demo_prompts.jsonl: {len(demo)} prompts; hh_harmless_prompts.jsonl: {len(hh)} prompts; "
          f"hh_harmless_preferences.jsonl: {len(pairs)} pairs -> {out}")


if __name__ == "__main__":
    main()
