"""Benchmark sampling: oaif's shared_prefill backend (transformers) vs a colocated vLLM engine.

    .venv-vllm/bin/python benchmarks/bench_sampling.py [--prompts 8] [--samples 2] [--tokens 64] \\
        [--dtypes float32 bfloat16] [--repeats 3] [--model smollm2-135m-instruct]

Both backends sample the same templated demo prompts (K samples each, temperature 0.9) from the
same weights in one process, as the trainer would. EOS is replaced by the vocabulary's last id
(a rare merge; the script checks it never came), so every response is exactly --tokens tokens
long and both backends do the same work. Repeats
alternate the two backends so machine load affects both alike; the medians and their ratio are
printed, with the engine's start time and the time to push the full weights into it. Each dtype
runs in a fresh process (one vLLM engine per process). Needs vLLM: run it with .venv-vllm's
Python (scripts/setup.sh --vllm).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def demo_prompts(n: int) -> list[str]:
    lines = (ROOT / "data/prompts/demo_prompts.jsonl").read_text().splitlines()
    return [json.loads(line)["prompt"] for line in lines[:n]]


class _NoEosTokenizer:
    """The tokenizer with another EOS id, so responses run to the length limit."""

    def __init__(self, tok, never: int):
        self._tok, self.eos_token_id, self.pad_token_id = tok, never, tok.pad_token_id


def run_one(args, dtype: str) -> dict:
    import torch

    from oaif.generation.base import StopRules
    from oaif.config import VllmConfig
    from oaif.generation.vllm_colocated import ColocatedVllm
    from oaif.generation.weights import policy_weights
    from oaif.models.chat import encode_prompt
    from oaif.models.load import load_causal_lm
    from oaif.models.resolve import resolve_model_path
    from oaif.step.sampling import sample_responses

    path = resolve_model_path(args.model)
    model, tok = load_causal_lm(path, dtype)
    prompts = [encode_prompt(tok, p) for p in demo_prompts(args.prompts)]
    never = len(tok) - 1
    model.generation_config.eos_token_id = never
    no_eos = _NoEosTokenizer(tok, never)
    positions = list(range(len(prompts)))
    sampling = dict(k=args.samples, seed=0, temperature=0.9, top_p=1.0, max_new_tokens=args.tokens)

    t0 = time.perf_counter()
    engine = ColocatedVllm(path, StopRules(frozenset({never})), VllmConfig(kv_cache_gib=1.0, dtype=dtype),
                           max_model_len=max(len(p) for p in prompts) + args.tokens + 16, policy_dtype=model.dtype)
    start_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine.load_weights(policy_weights(model))
    push_s = time.perf_counter() - t0

    backends = {
        "shared_prefill": lambda: sample_responses(model, no_eos, prompts, positions, **sampling)[0],
        "vllm": lambda: engine.sample(prompts, positions, **sampling)[0],
    }
    for fn in backends.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in backends}
    for r in range(args.repeats):
        order = list(backends) if r % 2 == 0 else list(reversed(backends))
        for name in order:
            t0 = time.perf_counter()
            responses = backends[name]()
            times[name].append(time.perf_counter() - t0)
            lengths = {len(x) for rs in responses for x in rs}
            assert lengths == {args.tokens}, f"{name}: response lengths {lengths}, expected {args.tokens}"
    engine.close()
    return {"dtype": dtype, "threads": torch.get_num_threads(), "engine_start_s": start_s, "weight_push_s": push_s,
            "times": times, "prompt_tokens": sum(len(p) for p in prompts)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one dtype, print JSON
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(args, args.one)), flush=True)
        return
    rows = []
    for dtype in args.dtypes:
        cmd = [sys.executable, __file__, "--one", dtype, "--model", args.model, "--prompts", str(args.prompts),
               "--samples", str(args.samples), "--tokens", str(args.tokens), "--repeats", str(args.repeats)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if out.returncode != 0 or not lines:
            sys.exit(f"bench_sampling: the {dtype} run failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(lines[-1][len("RESULT "):]))
    n = args.prompts * args.samples * args.tokens
    print(f"{args.prompts} prompts x {args.samples} samples x {args.tokens} new tokens ({n} tokens), model {args.model}, "
          f"{rows[0]['threads']} threads, median of {args.repeats} alternating repeats")
    print(f"{'dtype':<9} {'shared_prefill s':>16} {'vllm s':>8} {'ratio':>6} {'sp tok/s':>9} {'vllm tok/s':>10} "
          f"{'engine start s':>14} {'weight push s':>13}")
    for row in rows:
        sp, vl = statistics.median(row["times"]["shared_prefill"]), statistics.median(row["times"]["vllm"])
        print(f"{row['dtype']:<9} {sp:>16.2f} {vl:>8.2f} {sp / vl:>6.2f} {n / sp:>9.0f} {n / vl:>10.0f} "
              f"{row['engine_start_s']:>14.1f} {row['weight_push_s']:>13.2f}")
    print("ratio = shared_prefill time / vLLM time (above 1: vLLM is faster)")


if __name__ == "__main__":
    main()
