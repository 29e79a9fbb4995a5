"""benchmarks/bench_async.py's fast checks: its command line, and its delaying proxy (a second on loopback)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_bench_async_help_names_its_flags():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_async.py"), "--help"],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    for flag in ("--delay", "--steps", "--rounds", "--backend", "--batch-size", "--max-new-tokens", "--set", "--pin"):
        assert flag in result.stdout


def test_bench_async_refuses_too_few_steps(capsys):
    from bench_async import main

    with pytest.raises(SystemExit) as e:
        main(["--steps", "2"])
    assert e.value.code == 2 and "--steps: at least 3" in capsys.readouterr().err


class _Echo(BaseHTTPRequestHandler):
    """The upstream for the proxy test: answers every request with its method, path and body."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _answer(self, body: bytes) -> None:
        payload = json.dumps({"method": self.command, "path": self.path, "body": body.decode()}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self):
        self._answer(b"")

    def do_POST(self):
        self._answer(self.rfile.read(int(self.headers["Content-Length"])))


def test_the_delay_proxy_holds_each_post_and_forwards_it_unchanged():
    from bench_async import DelayProxy

    upstream = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=upstream.serve_forever, daemon=True)
    thread.start()
    try:
        with DelayProxy(f"http://127.0.0.1:{upstream.server_address[1]}", 2.0).running() as proxy:
            started = time.perf_counter()
            with urllib.request.urlopen(urllib.request.Request(proxy.url + "/v1/chat/completions", data=b'{"x": 1}',
                                                               headers={"Content-Type": "application/json"})) as r:
                posted = json.loads(r.read())
            post_s = time.perf_counter() - started
            started = time.perf_counter()
            with urllib.request.urlopen(proxy.url + "/v1/models") as r:
                listed = json.loads(r.read())
            get_s = time.perf_counter() - started
    finally:
        upstream.shutdown()
        upstream.server_close()
    assert posted == {"method": "POST", "path": "/v1/chat/completions", "body": '{"x": 1}'}
    assert listed == {"method": "GET", "path": "/v1/models", "body": ""}
    assert post_s >= 2.0 and get_s < 2.0  # only POSTs (judge requests) are held


def test_pin_moves_every_thread_of_a_real_process_to_one_core():
    import os

    from bench_async import parse_pin, pin

    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("needs two cores")
    # a process with a second thread, started before the pin
    code = "import threading, time; threading.Thread(target=time.sleep, args=(60,), daemon=True).start(); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        time.sleep(0.5)
        pin(proc.pid, cores[1])
        tasks = list(Path(f"/proc/{proc.pid}/task").iterdir())
        assert len(tasks) == 2 and all(os.sched_getaffinity(int(t.name)) == {cores[1]} for t in tasks)
    finally:
        proc.kill()
        proc.wait()
    assert parse_pin(f"{cores[0]}:{cores[1]}") == (cores[0], cores[1]) and parse_pin("none") is None


@pytest.mark.parametrize("text", ["0:0", "0", "a:b", "0:4096"])
def test_pin_refuses_what_is_not_two_cores_of_this_machine(text):
    import argparse

    from bench_async import parse_pin

    with pytest.raises(argparse.ArgumentTypeError, match=r"^--pin: expected TRAINER:JUDGE"):
        parse_pin(text)
