"""Benchmark: oaif against TRL's online DPO trainer on identical work, interleaved in one run.

    .venv-bench/bin/python benchmarks/bench_vs_trl.py [--precision float32|bf16|bf16-weights] [--steps 4]
        [--rounds 2] [--batch 8] [--max-new-tokens 64] [--device cpu|cuda] [--backend shared_prefill|vllm]
        [--threads N] [--forward-batch-size 8] [--no-floors] [--vllm-python PATH] [--model NAME]

The work (the same for both): SmolLM2-135M-Instruct (the embedded model; --model names another, e.g.
a hub id already in the Hugging Face cache, as oaif's model.name_or_path does), full fine-tuning, --batch
prompts per step x 2 samples, up to --max-new-tokens new tokens at temperature 0.9, DPO with beta
0.1, learning rate 5e-7 (constant), gradient clipping at 1.0, and a length rule as the judge
(fewer characters is better: TRL gets it as a reward function, oaif as a pointwise callable judge).
Both read the same demo prompts in the same order, through their chat templates. TRL runs with
gradient_checkpointing OFF: with it on (TRL's default) its generation runs without a KV cache.

--precision float32: float32 weights, no autocast. bf16: float32 weights with bf16 autocast (TRL's
bf16=True, oaif's train.mixed_precision=bf16). bf16-weights: the weights themselves in bfloat16
(TRL's model loaded in bfloat16, oaif's model.dtype=bfloat16).

Rounds interleave the two (oaif, TRL, oaif, TRL, ...), each a fresh process running --steps steps;
the first step of each process is a warm-up, the medians of the rest are reported. Per phase:
sample, annotate, update (the rest of the step: forwards, backward, optimizer). Peak memory is the
process's peak RSS after its steps (CPU) or torch.cuda.max_memory_allocated (GPU).

Floors (unless --no-floors), printed next to oaif's own numbers:
  * update: on one collected micro-batch, oaif's update (forwards, backward, clip, AdamW step)
    against a bare transformers step on the same sequences (one padded batch, `labels=` loss,
    backward, AdamW), alternately in one process, with and without a reference forward;
  * sampling: oaif's sampling against vLLM's own `LLM.generate` (standalone, n=2, same prompts,
    every response forced to --max-new-tokens tokens in both), when --vllm-python runs vLLM. oaif's
    side is its sampler for --backend: shared_prefill, `sample_responses` on the policy with the
    model's EOS swapped for a token that never comes; vllm, the trainer's own colocated engine
    (`ColocatedVllm.sample`: one seeded request per response, the engine's EOS ignored as always)
    with its stop rule swapped the same way. The standalone vLLM runs in a separate process after
    oaif's has ended, so the two never share memory or cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m-instruct"
LR = 5e-7


def shorter_is_better(prompt: str, response: str) -> float:
    """The judge: fewer characters is better (oaif's pointwise callable)."""
    return -float(len(response))


def prompts(n: int) -> list[str]:
    lines = (ROOT / "data/prompts/demo_prompts.jsonl").read_text().splitlines()
    return [json.loads(line)["prompt"] for line in (lines * (n // len(lines) + 1))[:n]]


def peak_memory(device: str) -> int:
    import resource

    import torch

    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def setup_threads(n: int) -> None:
    import torch

    if n > 0:
        torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------ oaif
def oaif_config(args, out: Path):
    from oaif.config import load_config

    data = out / "prompts.jsonl"
    data.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n"
                            for i, p in enumerate(prompts(args.batch * args.steps))))
    precision = {"float32": [], "bf16": ["train.mixed_precision=bf16"], "bf16-weights": ["model.dtype=bfloat16"]}
    return load_config(ROOT / "configs" / "demo.yaml", [
        f"model.name_or_path={args.model}", f"data.path={data}", "data.shuffle=false", "data.eval_fraction=0",
        "sampling.num_samples=2", "sampling.temperature=0.9", "sampling.top_p=1.0",
        f"sampling.max_new_tokens={args.max_new_tokens}", f"sampling.backend={args.backend}",
        "annotator.type=callable", f"annotator.callable={Path(__file__).resolve()}:shorter_is_better",
        "loss.type=dpo", "loss.beta=0.1", f"optim.lr={LR}", "optim.scheduler=constant", "optim.warmup_steps=0",
        "optim.max_grad_norm=1.0", f"train.batch_size={args.batch}", f"train.max_steps={args.steps}",
        f"train.output_dir={out / 'run'}", f"train.device={args.device}", "logging.progress_bar=false",
        f"train.forward_batch_size={args.forward_batch_size}", *precision[args.precision]])


def run_oaif(args) -> dict:
    from oaif.trainer import Trainer

    setup_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        t = Trainer(oaif_config(args, Path(tmp))).setup()
        steps = []
        for _ in range(args.steps):
            rec = t.run_step()
            sample, annotate = rec["time_sample_s"], rec["time_annotate_s"]
            steps.append({"step": rec["time_step_s"], "sample": sample, "annotate": annotate,
                          "update": rec["time_step_s"] - sample - annotate, "tokens": rec["generated_tokens"],
                          "pairs": rec["pairs_used"]})
        result = {"steps": steps, "peak_bytes": peak_memory(args.device)}
        if args.floors:
            result["floors"] = oaif_floors(t, args)
    return result


def oaif_floors(t, args) -> dict:
    """oaif's update vs a bare transformers step on the same sequences; oaif's fixed-length sampling."""
    import torch

    from oaif.generation.base import StopRules
    from oaif.step.logprobs import pad_rows
    from oaif.run.metrics import StepMetrics
    from oaif.step.sampling import sample_responses

    mb = t.collect(t.next_prompts(), StepMetrics())
    r, pad = mb.rollouts, t.tokenizer.pad_token_id
    flat = range(r.num_prompts * r.k)
    seqs = [r.prompt_tokens[f // r.k] + r.responses[f // r.k][f % r.k] for f in flat]
    ids, mask = (x.to(t.accelerator.device) for x in pad_rows(seqs, pad, side="right"))
    labels = ids.masked_fill(mask == 0, -100)
    for f, s in zip(flat, seqs):  # the loss counts response tokens only
        labels[f, :len(r.prompt_tokens[f // r.k])] = -100
    policy, reference = t.policy, t.parts.reference
    bare_opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=LR)

    def oaif_update():
        t.update(mb.rollouts, mb.prefs, global_pairs=mb.prefs.size)
        t.accelerator.clip_grad_norm_(policy.parameters(), 1.0)
        t.optimizer.step()
        t.optimizer.zero_grad(set_to_none=True)

    def bare(with_reference: bool):
        def run():
            if with_reference:
                with torch.no_grad():
                    reference(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
            policy(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            bare_opt.step()
            bare_opt.zero_grad(set_to_none=True)
        return run

    never = len(t.tokenizer) - 1  # EOS replaced by a token that never comes: every response runs to the limit

    class NoEos:
        eos_token_id, pad_token_id = never, pad

    model = t.unwrapped
    eos = model.generation_config.eos_token_id
    positions = list(range(len(r.prompt_tokens)))

    def sample_fixed():  # shared_prefill: oaif's sampler on the policy, the model's EOS swapped out
        model.generation_config.eos_token_id = never
        try:
            with t.accelerator.autocast():
                out, _ = sample_responses(model, NoEos(), r.prompt_tokens, positions, k=r.k, seed=0, temperature=0.9,
                                          top_p=1.0, max_new_tokens=args.max_new_tokens)
        finally:
            model.generation_config.eos_token_id = eos
        assert {len(x) for rs in out for x in rs} == {args.max_new_tokens}

    def vllm_fixed():  # vllm: the trainer's own engine (its requests ignore the engine's EOS), stopping at `never` only
        sampler, stop = t.sampler, t.sampler.stop
        sampler.stop = StopRules(frozenset({never}))
        try:
            out, _ = sampler.sample(r.prompt_tokens, positions, k=r.k, seed=0, temperature=0.9, top_p=1.0,
                                    max_new_tokens=args.max_new_tokens)
        finally:
            sampler.stop = stop
        assert {len(x) for rs in out for x in rs} == {args.max_new_tokens}

    runs = {"oaif_update": oaif_update, "bare_step": bare(False), "bare_step_with_reference": bare(True),
            "oaif_sample_fixed": {"shared_prefill": sample_fixed, "vllm": vllm_fixed}[args.backend]}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for name in runs:  # warm-up (AdamW state, allocator)
        runs[name]()
    for rep in range(args.floor_repeats):
        for name in (list(runs) if rep % 2 == 0 else list(reversed(runs))):
            t0 = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - t0)
    return {"times": times, "prompt_tokens": r.prompt_tokens, "sequences": len(seqs),
            "tokens": int(mask.sum()), "padded": int(mask.numel())}


# ------------------------------------------------------------------------------------------- TRL
def run_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    from oaif.models.resolve import resolve_model_path

    setup_threads(args.threads)
    path = resolve_model_path(args.model)
    dtype = torch.bfloat16 if args.precision == "bf16-weights" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in prompts(args.batch * args.steps)])

    def reward(prompts, completions, **kw):
        return [-float(len(c[0]["content"] if isinstance(c, list) else c)) for c in completions]

    phases = {"sample": 0.0, "annotate": 0.0, "tokens": 0}
    steps: list[dict] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            phases.update(sample=0.0, annotate=0.0, tokens=0, t0=time.perf_counter())

        def on_step_end(self, a, state, control, **kw):
            step = time.perf_counter() - phases["t0"]
            steps.append({"step": step, "sample": phases["sample"], "annotate": phases["annotate"],
                          "update": step - phases["sample"] - phases["annotate"], "tokens": phases["tokens"],
                          "pairs": args.batch})

    with tempfile.TemporaryDirectory() as tmp:
        config = OnlineDPOConfig(
            output_dir=tmp, per_device_train_batch_size=args.batch, max_steps=args.steps, learning_rate=LR,
            lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, beta=0.1, loss_type="sigmoid",
            max_new_tokens=args.max_new_tokens, temperature=0.9, top_p=1.0, gradient_checkpointing=False,
            bf16=args.precision == "bf16", use_cpu=args.device == "cpu", report_to=[], save_strategy="no",
            logging_steps=1, disable_tqdm=True, train_sampling_strategy="sequential", seed=42,
            dataloader_num_workers=0)
        trainer = OnlineDPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=data,
                                   processing_class=tok, callbacks=[Timer()])
        generate, rewards = trainer._generate, trainer._calculate_rewards_from_functions

        def timed_generate(*a, **kw):
            t0 = time.perf_counter()
            out = generate(*a, **kw)
            phases["sample"] += time.perf_counter() - t0
            phases["tokens"] += int(out[3].sum())
            return out

        def timed_rewards(*a, **kw):
            t0 = time.perf_counter()
            out = rewards(*a, **kw)
            phases["annotate"] += time.perf_counter() - t0
            return out

        trainer._generate, trainer._calculate_rewards_from_functions = timed_generate, timed_rewards
        trainer.train()
    return {"steps": steps, "peak_bytes": peak_memory(args.device)}


# ------------------------------------------------------------------------------- vLLM standalone
def run_vllm(args) -> dict:
    """vLLM's own generation of the floor's prompts: n=2, every response exactly --max-new-tokens tokens."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from oaif.models.resolve import resolve_model_path

    token_prompts = json.loads(Path(args.prompt_file).read_text())
    dtype = {"float32": "float32", "bf16": "bfloat16", "bf16-weights": "bfloat16"}[args.precision]
    llm = LLM(resolve_model_path(args.model), dtype=dtype, enforce_eager=True, seed=0,
              max_model_len=max(map(len, token_prompts)) + args.max_new_tokens + 16,
              **({"kv_cache_memory_bytes": 1 << 30} if args.device == "cpu" else {}))
    params = SamplingParams(n=2, temperature=0.9, top_p=1.0, max_tokens=args.max_new_tokens, ignore_eos=True)
    inputs = [TokensPrompt(prompt_token_ids=p) for p in token_prompts]

    def generate():
        outs = llm.generate(inputs, params, use_tqdm=False)
        assert {len(c.token_ids) for o in outs for c in o.outputs} == {args.max_new_tokens}

    generate()  # warm-up
    times = []
    for _ in range(args.floor_repeats):
        t0 = time.perf_counter()
        generate()
        times.append(time.perf_counter() - t0)
    return {"times": times}


# ------------------------------------------------------------------------------------------ main
def worker_cmd(python: str, which: str, args, extra: list[str] = ()) -> list[str]:
    cmd = [python, __file__, "--worker", which]
    for key in ("precision", "steps", "batch", "max_new_tokens", "device", "backend", "threads",
                "forward_batch_size", "floor_repeats", "model"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    return cmd + ([] if args.floors else ["--no-floors"]) + list(extra)


def run_worker(cmd: list[str], env: dict, required: bool = True) -> dict | None:
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        message = f"bench_vs_trl: {cmd[3]} failed (exit {out.returncode}):\n{out.stderr[-4000:]}"
        if required:
            sys.exit(message)
        print(message, file=sys.stderr, flush=True)  # an optional floor: the comparison goes on without it
        return None
    return json.loads(lines[-1][len("RESULT "):])


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def med(values) -> float:
    return statistics.median(values) if values else float("nan")


def summarize(runs: list[dict]) -> dict:
    """Medians over every process's steps after its first."""
    steps = [s for r in runs for s in r["steps"][1:]]
    out = {k: med([s[k] for s in steps]) for k in ("step", "sample", "annotate", "update", "tokens", "pairs")}
    out["peak_gib"] = max(r["peak_bytes"] for r in runs) / 2**30
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precision", choices=["float32", "bf16", "bf16-weights"], default="float32")
    ap.add_argument("--steps", type=int, default=4, help="steps per process (the first is a warm-up)")
    ap.add_argument("--rounds", type=int, default=2, help="oaif/TRL process pairs, interleaved")
    ap.add_argument("--batch", type=int, default=8, help="prompts per step (2 samples each)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--model", default=MODEL, help="the policy: the embedded model, a directory or a cached hub id")
    ap.add_argument("--backend", choices=["shared_prefill", "vllm"], default="shared_prefill",
                    help="oaif's sampling.backend (vllm runs oaif's process with --vllm-python)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in every process (0: torch's default)")
    ap.add_argument("--forward-batch-size", type=int, default=8, help="oaif's train.forward_batch_size")
    ap.add_argument("--floor-repeats", type=int, default=3)
    ap.add_argument("--no-floors", dest="floors", action="store_false")
    ap.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm/bin/python"),
                    help="a Python with vLLM: the standalone sampling floor, and oaif with --backend vllm")
    ap.add_argument("--only", choices=["oaif", "trl"], help="run one side only (no ratios)")
    ap.add_argument("--json", help="also write every process's raw results to this file")
    ap.add_argument("--worker", choices=["oaif", "trl", "vllm"], help=argparse.SUPPRESS)
    ap.add_argument("--prompt-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        result = {"oaif": run_oaif, "trl": run_trl, "vllm": run_vllm}[args.worker](args)
        print("RESULT " + json.dumps(result), flush=True)
        return

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    if args.threads > 0:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
                   VLLM_CPU_OMP_THREADS_BIND=f"0-{args.threads - 1}" if args.threads > 1 else "0")
    has_vllm = Path(args.vllm_python).exists()
    oaif_python = args.vllm_python if args.backend == "vllm" else sys.executable
    if args.backend == "vllm" and not has_vllm:
        sys.exit(f"bench_vs_trl: --backend vllm needs vLLM: {args.vllm_python} not found (scripts/setup.sh --vllm)")
    loads = [load_average()]
    results: dict[str, list[dict]] = {"oaif": [], "trl": [], "vllm": []}
    sides = [args.only] if args.only else ["oaif", "trl"]
    started = time.perf_counter()
    for rnd in range(args.rounds):
        for side in (sides if rnd % 2 == 0 else list(reversed(sides))):
            python = oaif_python if side == "oaif" else sys.executable
            results[side].append(run_worker(worker_cmd(python, side, args), env))
            loads.append(load_average())
            print(f"  round {rnd + 1}: {side} done ({time.perf_counter() - started:.0f} s, load {loads[-1]})",
                  file=sys.stderr, flush=True)
            floors = results[side][-1].get("floors")
            if side == "oaif" and floors and has_vllm and "oaif_sample_fixed" in floors["times"]:
                with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
                    json.dump(floors["prompt_tokens"], f)
                vllm = run_worker(worker_cmd(args.vllm_python, "vllm", args, ["--prompt-file", f.name]), env,
                                  required=False)
                results["vllm"] += [vllm] if vllm else []
                os.unlink(f.name)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "loads": loads, "results": results}))
    report(args, results, loads)


def report(args, results: dict, loads: list[str]) -> None:
    import torch

    threads = args.threads or torch.get_num_threads()
    print(f"oaif vs TRL online DPO: {args.model}, {args.precision}, {args.batch} prompts x 2 samples, <= {args.max_new_tokens} "
          f"new tokens, temperature 0.9, DPO beta 0.1, length judge, full fine-tuning, device {args.device}, "
          f"{threads} threads, oaif sampling.backend={args.backend}, train.forward_batch_size={args.forward_batch_size}; "
          f"TRL {trl_version()} with gradient_checkpointing=False (its default, True, generates without a KV cache)")
    print(f"{args.rounds} interleaved rounds x {args.steps} steps per process; medians of the steps after each "
          f"process's first; load average (1/5/15 min) before and after each process: {' | '.join(loads)}")
    rows = {side: summarize(runs) for side, runs in results.items() if side != "vllm" and runs}
    print(f"{'':<6} {'step s':>8} {'sample s':>9} {'annotate s':>10} {'update s':>9} {'gen tok':>8} "
          f"{'gen tok/s':>9} {'pairs':>6} {'peak GiB':>9}")
    for side, r in rows.items():
        print(f"{side:<6} {r['step']:>8.2f} {r['sample']:>9.2f} {r['annotate']:>10.3f} {r['update']:>9.2f} "
              f"{r['tokens']:>8.0f} {r['tokens'] / r['sample']:>9.1f} {r['pairs']:>6.0f} {r['peak_gib']:>9.2f}")
    if len(rows) == 2:
        o, t = rows["oaif"], rows["trl"]
        print(f"ratio TRL/oaif: step {t['step'] / o['step']:.2f}x (oaif's step rate over TRL's), sample "
              f"{t['sample'] / o['sample']:.2f}x, update {t['update'] / o['update']:.2f}x, "
              f"generated tokens/s {(o['tokens'] / o['sample']) / (t['tokens'] / t['sample']):.2f}x; "
              f"peak memory oaif/TRL {o['peak_gib'] / t['peak_gib']:.2f}")
    targets: list[tuple[str, float, str, float]] = []  # (what, measured, <= or >=, target)
    if len(rows) == 2:
        best = args.precision != "float32" or args.backend == "vllm"
        setting = "each at its best; this run's settings" if best else "float32, no vLLM"
        targets.append((f"step rate oaif/TRL ({setting})", rows["trl"]["step"] / rows["oaif"]["step"], ">=",
                        3.0 if best else 2.0))
        targets.append(("peak memory oaif/TRL", rows["oaif"]["peak_gib"] / rows["trl"]["peak_gib"], "<=", 1.0))
    floors = [r["floors"] for r in results["oaif"] if r.get("floors")]
    if floors:
        times = {k: med([x for f in floors for x in f["times"][k]]) for k in floors[0]["times"]}
        f0 = floors[0]
        print(f"update floor (one micro-batch, {f0['sequences']} sequences, {f0['tokens']} tokens in a "
              f"{f0['padded']}-slot padded batch for the bare step): oaif update {times['oaif_update']:.2f} s; "
              f"bare forward+backward+AdamW {times['bare_step']:.2f} s (ratio {times['oaif_update'] / times['bare_step']:.2f}); "
              f"bare with a reference forward {times['bare_step_with_reference']:.2f} s "
              f"(ratio {times['oaif_update'] / times['bare_step_with_reference']:.2f})")
        vllm = [x for r in results["vllm"] for x in r["times"]]
        if "oaif_sample_fixed" in times:
            line = (f"sampling floor ({len(f0['prompt_tokens'])} prompts x 2 x {args.max_new_tokens} tokens, no EOS): "
                    f"oaif ({args.backend}) {times['oaif_sample_fixed']:.2f} s")
            if vllm:
                line += f"; vLLM standalone {med(vllm):.2f} s (ratio {times['oaif_sample_fixed'] / med(vllm):.2f})"
                targets.append(("sampling oaif/vLLM standalone", times["oaif_sample_fixed"] / med(vllm), "<=", 1.25))
            else:
                line += f"; vLLM standalone: not run ({args.vllm_python} missing or failed)"
            print(line)
        targets.append(("update oaif/bare forward+backward+AdamW", times["oaif_update"] / times["bare_step"], "<=", 1.2))
    for what, value, op, goal in targets:
        met = value >= goal if op == ">=" else value <= goal
        print(f"target {what}: {value:.2f} (target {op} {goal:g}): {'met' if met else 'MISSED'}")


def trl_version() -> str:
    try:
        from importlib.metadata import version

        return version("trl")
    except Exception:
        return "(not installed)"


if __name__ == "__main__":
    main()
