"""Benchmark the in-process LLM judge: batched, shared-prefix forward vs a naive per-pair, per-order loop.

    python benchmarks/bench_judge.py [--pairs 16] [--repeats 3] [--model smollm2-135m-instruct]

Both variants judge the same pairs (both orders) with the same model; the script checks that they
give the same probabilities and prints the wall time of each and the speedup. The repeats are
interleaved so that machine load affects both variants alike.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

from oaif.annotators.base import PairRequest
from oaif.annotators.llm_judge import LLMJudge
from oaif.annotators.rubrics import load_rubric
from oaif.models.load import load_causal_lm

ROOT = Path(__file__).resolve().parent.parent


def make_pairs(n: int) -> list[PairRequest]:
    prompts = [json.loads(line)["prompt"] for line in (ROOT / "data/prompts/demo_prompts.jsonl").read_text().splitlines()]
    pairs = []
    for i, p in enumerate(prompts[:n]):
        a = f"Here is a short answer to your request ({i}): it depends on the details you care about most."
        b = "I can help with that. First, think about what you want to achieve, then list the steps, " \
            "check each one carefully, and finally review the result before you share it."
        pairs.append(PairRequest(p, a, b, str(i)))
    return pairs


def naive(judge: LLMJudge, pairs: list[PairRequest]) -> list[float]:
    out = []
    for r in pairs:
        ps = []
        for first, second in ((r.a, r.b), (r.b, r.a)):
            l1, l2 = judge.label_logprobs([judge.judge_tokens(r.prompt, first, second)])[0].tolist()
            ps.append(1 / (1 + math.exp(l2 - l1)))
        out.append((ps[0] + 1 - ps[1]) / 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    model, tok = load_causal_lm(args.model)
    pairs = make_pairs(args.pairs)
    batched = LLMJudge(model, tok, load_rubric("helpful"), batch_size=args.batch_size)
    unshared = LLMJudge(model, tok, load_rubric("helpful"), batch_size=args.batch_size, share_prefix=False)
    one = LLMJudge(model, tok, load_rubric("helpful"), batch_size=1, share_prefix=False)
    batched.annotate(pairs[:2])  # warm-up
    times: dict[str, list[float]] = {"naive loop (1 pair, 1 order per forward)": [], "batched, no shared prefix": [],
                                     "batched + shared prefix (default)": []}
    results = {}
    for _ in range(args.repeats):
        for name, fn in zip(times, (lambda: naive(one, pairs), lambda: [j.prob for j in unshared.annotate(pairs)],
                                    lambda: [j.prob for j in batched.annotate(pairs)])):
            t0 = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - t0)
    ref = results["naive loop (1 pair, 1 order per forward)"]
    base = statistics.median(times["naive loop (1 pair, 1 order per forward)"])
    print(f"{args.pairs} pairs x 2 orders, model {args.model}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} interleaved repeats")
    for name, ts in times.items():
        t = statistics.median(ts)
        diff = max(abs(a - b) for a, b in zip(results[name], ref))
        print(f"  {name:45s} {t:7.2f} s  {2 * args.pairs / t:6.1f} judgments/s  speedup {base / t:4.2f}x  "
              f"max |dP| vs naive {diff:.1e}")


if __name__ == "__main__":
    main()
