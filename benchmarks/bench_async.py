"""Benchmark ``train.async_steps``: synchronous steps against ``async_steps=1`` with a slow judge server.

    python benchmarks/bench_async.py [--delay 2.0] [--steps 5] [--rounds 2] [--backend shared_prefill] [--pin 0:1]
    .venv-vllm/bin/python benchmarks/bench_async.py --backend vllm     # the colocated vLLM engine samples

The judge is a real server on loopback: the llama.cpp server (llama-cpp-python) serving the embedded
SmolLM2-135M-Instruct GGUF (``annotator.type=openai``), behind a small proxy that holds every chat
request ``--delay`` seconds before passing it on, standing in for a large judge that answers in
seconds. The policy trains as in the demo (``configs/demo.yaml``: the embedded model, 4 prompts x 2
samples a step). Runs alternate (sync, async, sync, async, ...) so that machine load falls on both
alike. ``--pin T:J`` (the default on a machine with two or more cores: ``0:1``) runs this process (the
trainer and its sampler, one torch thread) on core T and the judge server (one thread) on core J, so that
the judge computes on hardware of its own as a judge on another machine or GPU would; ``--pin none``
shares every core. With ``--backend vllm`` the judge server runs under the project's ``.venv`` Python
(llama-cpp-python is not in ``.venv-vllm``). Each run's first and last steps are left out of the means (the first step of an async run
cannot overlap anything; its last waits for the final push).

Printed per mode: the mean seconds of each phase per step (sampling and judging are the worker's
seconds under async, overlapped with the update), the step time (sync: the step plus its weight
push; async: the step, which includes waiting for the worker), ``policy_lag``, and ``logprob_gap``
where the metrics hold it. Then the async step against max(sample + annotate, update), and the
speedup of async over sync.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import json
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo.yaml"


class DelayProxy(ThreadingHTTPServer):
    """An HTTP proxy on loopback to ``upstream`` that holds each POST ``delay`` seconds before forwarding it."""

    daemon_threads = True

    def __init__(self, upstream: str, delay: float, core: int | None = None):
        self.upstream, self.delay, self.core = upstream.rstrip("/"), delay, core
        super().__init__(("127.0.0.1", 0), _Forward)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def _serve(self) -> None:
        if self.core is not None:  # the judge's side: this thread and the request threads it starts
            os.sched_setaffinity(0, {self.core})
        self.serve_forever()

    @contextlib.contextmanager
    def running(self):
        thread = threading.Thread(target=self._serve, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.shutdown()
            self.server_close()
            thread.join()


class _Forward(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def _forward(self, body: bytes | None) -> None:
        server: DelayProxy = self.server  # type: ignore[assignment]
        if body is not None:
            time.sleep(server.delay)
        headers = {k: v for k, v in self.headers.items() if k.lower() in ("content-type", "authorization", "accept")}
        request = urllib.request.Request(server.upstream + self.path, data=body, method=self.command, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=600) as r:
                status, payload, kind = r.status, r.read(), r.headers.get("Content-Type", "application/json")
        except urllib.error.HTTPError as e:
            status, payload, kind = e.code, e.read(), e.headers.get("Content-Type", "application/json")
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self):
        self._forward(None)

    def do_POST(self):
        self._forward(self.rfile.read(int(self.headers.get("Content-Length", 0))))


def pin(pid: int | str, core: int) -> None:
    """Every thread of process ``pid`` ("self": this one) on ``core``; threads started later inherit it."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(task.name), {core})


def judge_python() -> str:
    """An interpreter with llama-cpp-python: this one, or the project's .venv (vLLM's venv has none)."""
    venv = ROOT / ".venv" / "bin" / "python"
    return sys.executable if importlib.util.find_spec("llama_cpp") is not None or not venv.exists() else str(venv)


def parse_pin(text: str) -> tuple[int, int] | None:
    if text == "none":
        return None
    trainer, _, judge = text.partition(":")
    cores = os.sched_getaffinity(0)
    if not (trainer.isdigit() and judge.isdigit() and {int(trainer), int(judge)} <= cores and trainer != judge):
        raise argparse.ArgumentTypeError(f"--pin: expected TRAINER:JUDGE, two different cores of {sorted(cores)}, "
                                         f"or none; got {text!r}")
    return int(trainer), int(judge)


def run_once(out: Path, async_steps: int, judge_url: str, judge_model: str, args) -> list[dict]:
    from oaif.config import load_config
    from oaif.run.metrics import read_metrics
    from oaif.trainer import train

    overrides = [f"train.output_dir={out}", f"train.async_steps={async_steps}", f"train.max_steps={args.steps}",
                 "train.save_every=0", "train.overwrite_output_dir=true", "logging.progress_bar=false",
                 "annotator.type=openai", f"annotator.base_url={judge_url}/v1", f"annotator.model={judge_model}",
                 f"sampling.backend={args.backend}", f"sampling.max_new_tokens={args.max_new_tokens}",
                 f"train.batch_size={args.batch_size}", "optim.warmup_steps=0", "annotator.request_timeout=600",
                 *args.set]
    train(load_config(DEMO, overrides))
    return read_metrics(out / "metrics.jsonl")


def step_seconds(r: dict) -> float:
    """A step's wall time: sync pushes after the step; async waits for the worker inside it."""
    return r["time_step_s"] + (r["time_weight_sync_s"] if "time_wait_s" not in r else 0.0)


def summarize(records: list[dict]) -> dict:
    keys = ("time_sample_s", "time_annotate_s", "time_update_s", "time_weight_sync_s", "time_wait_s")
    row = {k: statistics.mean(r.get(k, 0.0) for r in records) for k in keys}
    row["step"] = statistics.mean(step_seconds(r) for r in records)
    row["policy_lag"] = sorted({r["policy_lag"] for r in records})
    gaps = [r["logprob_gap"] for r in records if "logprob_gap" in r]
    row["logprob_gap"] = statistics.mean(gaps) if gaps else None
    row["steps"] = len(records)
    return row


def table(rows: dict[str, dict]) -> str:
    lines = ["| mode | steps | sample s | annotate s | update s | weight sync s | wait s | step s | policy_lag | logprob_gap |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in rows.items():
        gap = "n/a" if r["logprob_gap"] is None else f"{r['logprob_gap']:.4f}"
        lines.append(f"| {name} | {r['steps']} | {r['time_sample_s']:.2f} | {r['time_annotate_s']:.2f} | "
                     f"{r['time_update_s']:.2f} | {r['time_weight_sync_s']:.2f} | {r['time_wait_s']:.2f} | "
                     f"{r['step']:.2f} | {','.join(map(str, r['policy_lag']))} | {gap} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--delay", type=float, default=2.0, help="seconds the proxy holds each judge request (default 2)")
    ap.add_argument("--steps", type=int, default=5, help="steps per run (the first and last are not counted)")
    ap.add_argument("--rounds", type=int, default=2, help="sync/async pairs of runs, interleaved")
    ap.add_argument("--backend", default="shared_prefill", help="sampling.backend: shared_prefill, hf or vllm")
    ap.add_argument("--batch-size", type=int, default=4, help="train.batch_size (prompts a step)")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="sampling.max_new_tokens")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="another config override")
    ap.add_argument("--out", help="directory for the runs (default: a temporary one)")
    ap.add_argument("--pin", type=parse_pin, default="0:1" if len(os.sched_getaffinity(0)) >= 2 else "none",
                    metavar="TRAINER:JUDGE", help="cores for this process and the judge server, or none (default 0:1 "
                    "with two or more cores)")
    args = ap.parse_args(argv)
    if args.steps < 3:
        ap.error("--steps: at least 3 (the first and last steps are not counted)")
    sys.path.insert(0, str(ROOT / "tests"))
    from llama_server import smollm2_gguf, start_llama_server

    python = judge_python()
    if smollm2_gguf() is None or importlib.util.find_spec("llama_cpp") is None and python == sys.executable:
        sys.exit("bench_async: needs llama-cpp-python[server] and the embedded GGUF (scripts/setup.sh --tests)")
    if args.pin:
        import torch

        torch.set_num_threads(1)
        pin("self", args.pin[0])
    per_mode: dict[str, list[dict]] = {"sync": [], "async_steps=1": []}
    with contextlib.ExitStack() as stack:
        out = Path(args.out) if args.out else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        server = stack.enter_context(start_llama_server(python=python, n_threads=1 if args.pin else 2))
        if args.pin:
            pin(server.process.pid, args.pin[1])
        proxy = stack.enter_context(DelayProxy(server.base_url.removesuffix("/v1"), args.delay,
                                               args.pin[1] if args.pin else None).running())
        for r in range(args.rounds):
            for name, steps in (("sync", 0), ("async_steps=1", 1)):
                started = time.perf_counter()
                records = run_once(out / f"{name}-{r}", steps, proxy.url, server.model, args)
                per_mode[name] += records[1:-1]
                print(f"[round {r + 1} {name}: {time.perf_counter() - started:.0f}s]", file=sys.stderr, flush=True)
    rows = {name: summarize(records) for name, records in per_mode.items()}
    cores = (f"trainer on core {args.pin[0]} (1 torch thread), judge server on core {args.pin[1]} (1 thread)"
             if args.pin else f"every process on every core ({len(os.sched_getaffinity(0))})")
    print(f"judge: llama.cpp server (embedded SmolLM2-135M GGUF) behind a proxy adding {args.delay:g} s per request; "
          f"{cores}; {' '.join(args.set) or 'no other overrides'}; policy: {DEMO.name}, sampling.backend={args.backend}, {args.batch_size} prompts x 2 samples, "
          f"max_new_tokens={args.max_new_tokens}; {args.rounds} rounds x {args.steps} steps (first and last not counted)")
    print(table(rows))
    s, a = rows["sync"], rows["async_steps=1"]
    bound = max(a["time_sample_s"] + a["time_annotate_s"], a["time_update_s"])
    print(f"async step / max(sample + annotate, update) = {a['step']:.2f} / {bound:.2f} = {a['step'] / bound:.2f} "
          f"(target <= 1.1)")
    print(f"sync step / async step = {s['step']:.2f} / {a['step']:.2f} = {s['step'] / a['step']:.2f} "
          f"(target >= 1.5 when judging and the update take about the same time)")
    print(json.dumps({"rows": rows, "delay_s": args.delay}), file=sys.stderr)


if __name__ == "__main__":
    main()
