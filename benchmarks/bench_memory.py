"""Benchmark: memory per process for full fine-tuning on 1 process, 2 processes (DDP) and 2 with train.fsdp.

    .venv/bin/python benchmarks/bench_memory.py [--model smollm2-135m-instruct|tiny|PATH] [--steps 2]
        [--only one,ddp,fsdp] [--json PATH]

Each configuration trains offline DPO (float32 weights, no autocast, AdamW, a frozen reference copy) on
the same global batch of 4 preference pairs a step (1 process: 4; 2 processes: 2 each), for --steps
steps, on the CPU (gloo between processes), through oaif's own trainer (``Trainer.run_step``). Each
process reports:

  weights  bytes of the policy's and the reference's parameters it holds (its shards under FSDP)
  grads    bytes of the gradients it holds at the optimizer step (its shards under FSDP)
  adam     bytes of AdamW's states it holds after the step (its shards under FSDP)
  held     weights + grads + adam: counted from the tensors themselves, exact
  steps RSS  the process's largest resident memory while it takes the steps (sampled every 5 ms; before
           them, memory freed during setup is handed back to the OS with glibc's malloc_trim): also
           the Python runtime, libraries, activations and, under FSDP, the layers gathered for a forward
  setup RSS  its peak resident memory over the whole run (``ru_maxrss``), which here is loading: every
           process loads the full policy and copies the reference before sharding them
Both RSS figures depend on the machine and its allocator.

``--model tiny`` is a random 2-layer Llama with SmolLM2's tokenizer (a quick check of the script).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {"one": (1, False), "ddp": (2, False), "fsdp": (2, True)}
MiB = 2 ** 20


def local_bytes(tensors) -> int:
    """Bytes of the tensors this process holds (a DTensor's local shard), each tensor once."""
    seen, total = set(), 0
    for t in tensors:
        if t is None or id(t) in seen:
            continue
        seen.add(id(t))
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def full_bytes(model) -> int:
    """Bytes of ``model``'s parameters unsharded (a DTensor counts its global shape), each once."""
    unique = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() * p.element_size() for p in unique)


def release_freed_memory() -> None:
    """Hand memory that the process freed back to the OS (glibc's ``malloc_trim``; nothing elsewhere)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class RssSampler:
    """The largest resident set size of this process while the block runs, sampled every 5 ms."""

    def __enter__(self):
        import threading

        import psutil  # an accelerate dependency

        self.peak, self._stop, proc = 0, threading.Event(), psutil.Process()

        def sample():
            while not self._stop.is_set():
                self.peak = max(self.peak, proc.memory_info().rss)
                self._stop.wait(0.005)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def worker(out: Path, overrides: list[str]) -> None:
    """One process of a configuration: build the run, take the steps, write ``rank-<i>.json``."""
    from oaif.config import load_config
    from oaif.trainer import Trainer

    cfg = load_config(ROOT / "configs" / "demo.yaml", overrides)
    trainer = Trainer(cfg).setup()
    policy, reference = trainer.unwrapped, trainer.parts.reference
    grads = []
    trainer.optimizer.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: grads.append(local_bytes(p.grad for g in opt.param_groups for p in g["params"])))
    release_freed_memory()  # the full copies each process loaded before sharding: freed, but kept by malloc
    sampler = RssSampler()
    try:
        with sampler:
            for _ in range(cfg.train.max_steps):
                trainer.run_step()
    finally:
        trainer.close()
    weights = local_bytes([*policy.parameters(), *(reference.parameters() if reference is not None else [])])
    adam = local_bytes(v for s in trainer.optimizer.optimizer.state.values() for v in s.values()
                       if hasattr(v, "numel") and v.dim() > 0)
    report = {"rank": trainer.accelerator.process_index, "weights": weights, "grads": max(grads, default=0),
              "adam": adam, "steps_rss": sampler.peak, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              "model_full": full_bytes(policy)}
    (out / f"rank-{report['rank']}.json").write_text(json.dumps(report))


def tiny_model(directory: Path) -> str:
    """A random 2-layer Llama with the embedded SmolLM2's tokenizer, saved in ``directory``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from oaif.models.resolve import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m-instruct"), local_files_only=True)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def preference_file(path: Path) -> Path:
    rows = [{"prompt": f"Question {i}: what is {i} plus {i}? Answer briefly.", "chosen": f"{2 * i}.",
             "rejected": f"I think it might be {2 * i + 1}, but I am not sure at all about it."} for i in range(16)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_config(name: str, model: str, steps: int, tmp: Path) -> list[dict]:
    procs, fsdp = CONFIGS[name]
    out = tmp / name
    out.mkdir()
    overrides = [f"model.name_or_path={model}", "train.mode=offline",
                 f"data.preference_path={preference_file(tmp / 'prefs.jsonl')}", f"train.output_dir={out / 'run'}",
                 f"train.batch_size={4 // procs}", f"train.max_steps={steps}", "train.device=cpu",
                 "logging.progress_bar=false", "optim.warmup_steps=0", f"train.fsdp={str(fsdp).lower()}"]
    script = [str(Path(__file__).resolve()), "--worker", str(out), *overrides]
    if procs == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes",
               str(procs), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *script]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if result.returncode != 0:
        sys.exit(f"bench_memory: {name} failed:\n{result.stderr[-3000:]}")
    return [json.loads((out / f"rank-{i}.json").read_text()) for i in range(procs)]


def table(results: dict[str, list[dict]]) -> str:
    lines = ["| configuration | process | weights MiB | grads MiB | adam MiB | held MiB | steps RSS MiB | setup RSS MiB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    names = {"one": "1 process", "ddp": "2 processes", "fsdp": "2 processes, train.fsdp=true"}
    for name, ranks in results.items():
        for r in ranks:
            held = r["weights"] + r["grads"] + r["adam"]
            lines.append(f"| {names[name]} | {r['rank']} | {r['weights'] / MiB:.0f} | {r['grads'] / MiB:.0f} | "
                         f"{r['adam'] / MiB:.0f} | {held / MiB:.0f} | {r['steps_rss'] / MiB:.0f} | {r['peak_rss'] / MiB:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="a model oaif loads, or tiny")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--only", default="one,ddp,fsdp", help="configurations, comma-separated: one, ddp, fsdp")
    parser.add_argument("--json", help="also write the per-process numbers (bytes) to this file")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    if unknown := [n for n in names if n not in CONFIGS]:
        parser.error(f"--only: unknown configuration {unknown[0]} (one, ddp, fsdp)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = tiny_model(tmp / "tiny") if args.model == "tiny" else args.model
        results = {name: run_config(name, model, args.steps, tmp) for name in names}
    full = next(iter(results.values()))[0]["model_full"]
    print(f"model: {args.model} ({full / MiB:.0f} MiB of float32 parameters), full fine-tuning, offline DPO, "
          f"{args.steps} steps, CPU")
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker(Path(sys.argv[2]), sys.argv[3:])
    else:
        main()
