"""Benchmark the weight push after a step (``time_weight_sync_s``): a vLLM server through the disk, the same
server through the collective group, and a colocated engine in place.

    .venv-vllm/bin/python benchmarks/bench_weight_sync.py [--repeats 5] [--model smollm2-135m-instruct] \\
        [--bucket-mib 256]

One process holds the policy (float32, as a full fine-tuning run) and a colocated engine; a vLLM
server on loopback (started here, like the README's command) serves the same model. Each repeat pushes
the full weights once each way, in turn (disk, collective, colocated), so machine load affects all
three alike; each push is what the trainer times as ``time_weight_sync_s``: the tensors gathered
(``policy_weights``) and loaded by the engine, prefix cache reset. The first push of each way is a
warm-up (the collective one forms the group) and is not counted. Prints median and min per way and the
ratio collective / colocated against the issue's target (within 2x). Needs vLLM: run it with
.venv-vllm's Python.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET = 2.0  # the target: collective within 2x of the colocated in-place push


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def vllm_server(model_dir: str, log_path: Path, startup_s: float = 600.0):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len", "1024",
           "--no-enable-chunked-prefill", "--max-num-batched-tokens", "2048", "--max-num-seqs", "16",
           "--kv-cache-memory-bytes", str(256 * 2**20),
           "--worker-extension-cls", "oaif.generation.vllm_worker.WeightSyncExtension"]
    env = dict(os.environ, VLLM_SERVER_DEV_MODE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + startup_s
        while True:
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the vLLM server did not start; see {log_path}")
            time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def timed(generator, model) -> float:
    from oaif.generation.weights import policy_weights

    start = time.perf_counter()
    generator.load_weights(policy_weights(model))
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="timed pushes per way, interleaved (after one warm-up)")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="model name or directory (default: embedded)")
    ap.add_argument("--bucket-mib", type=int, default=256, help="vllm.sync_bucket_mib of the collective push")
    args = ap.parse_args()

    import torch

    from oaif.config import VllmConfig
    from oaif.generation.base import StopRules
    from oaif.generation.vllm_colocated import ColocatedVllm
    from oaif.generation.vllm_server import VllmServer
    from oaif.generation.weights import policy_weights
    from oaif.models.load import load_causal_lm
    from oaif.models.resolve import resolve_model_path

    path = str(resolve_model_path(args.model))
    model, tok = load_causal_lm(path)
    stop = StopRules(frozenset({tok.eos_token_id}))
    size_mib = sum(t.numel() * t.element_size() for _, t in policy_weights(model)) / 2**20  # what a push sends
    with tempfile.TemporaryDirectory(prefix="bench_weight_sync_") as tmp, vllm_server(path, Path(tmp) / "server.log") as url:
        ways = {
            "disk": VllmServer(stop, VllmConfig(mode="server", server_url=url), weights_dir=Path(tmp) / "weights"),
            "collective": VllmServer(stop, VllmConfig(mode="server", server_url=url, weight_sync="collective",
                                                      sync_bucket_mib=args.bucket_mib), weights_dir=Path(tmp) / "unused"),
            "colocated": ColocatedVllm(path, stop, VllmConfig(kv_cache_gib=0.25), max_model_len=1024,
                                       policy_dtype=torch.float32),
        }
        times = {name: [] for name in ways}
        for name, generator in ways.items():
            timed(generator, model)  # warm-up; the collective one forms the group
        for _ in range(args.repeats):
            for name, generator in ways.items():
                times[name].append(timed(generator, model))
        for generator in ways.values():
            generator.close()
        assert not (Path(tmp) / "unused").exists(), "the collective push wrote files"

    print(f"\nweight push of {args.model} ({size_mib:.0f} MiB float32), {args.repeats} interleaved repeats "
          f"(torch {torch.__version__}, {os.cpu_count()} CPUs)\n")
    print("| way | median s | min s |\n| --- | --- | --- |")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.3f} | {min(values):.3f} |")
    ratio = statistics.median(times["collective"]) / statistics.median(times["colocated"])
    verdict = "met" if ratio <= TARGET else "MISSED"
    print(f"\ncollective / colocated (medians): {ratio:.2f}x; target <= {TARGET:g}x: {verdict}")


if __name__ == "__main__":
    main()
