"""``annotator.request_timeout`` is a deadline: a trickling server is cut at it, retries included.

The servers here are hand-written sockets on loopback on purpose: the fault is a server that
keeps a connection alive by sending one byte at a time (or answers 503 with a long Retry-After),
which a real llama.cpp server cannot be made to do. Everything on the client side is real: the
OpenAI SDK, httpx, the sockets, and the judge.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from oaif.annotators.base import PairRequest
from oaif.annotators.openai_judge import OpenAIJudge
from oaif.annotators.rubrics import load_rubric
from oaif.cli import main

DEADLINE = 1.5
SLACK = 1.0  # thread scheduling on a busy 2-core machine; far below what a trickle would take

BODY = json.dumps({
    "id": "x", "object": "chat.completion", "created": 0, "model": "trickle",
    "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "1"},
                 "logprobs": {"content": [{"token": "1", "logprob": -0.1, "bytes": None,
                                           "top_logprobs": [{"token": "1", "logprob": -0.1, "bytes": None},
                                                            {"token": "2", "logprob": -2.4, "bytes": None}]}]}}],
}).encode()


class TrickleServer:
    """Answers every request on loopback, one byte every ``interval`` seconds.

    ``part="headers"``: the status line and headers trickle; ``part="body"``: the headers come at
    once and the (valid) JSON body trickles. A full answer would take minutes.
    """

    def __init__(self, part: str, interval: float = 0.2):
        self.part, self.interval = part, interval
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.base_url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.stop = threading.Event()
        self.requests = 0
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self):
        self.sock.settimeout(0.1)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _read_request(self, conn) -> bool:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return False
            data += chunk
        head, body = data.split(b"\r\n\r\n", 1)
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), 0)
        while len(body) < length:
            chunk = conn.recv(65536)
            if not chunk:
                return False
            body += chunk
        return True

    def _answer(self, conn):
        with conn:
            conn.settimeout(5)
            try:
                while not self.stop.is_set() and self._read_request(conn):
                    with self.lock:
                        self.requests += 1
                    headers = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                               b"Content-Length: " + str(len(BODY)).encode() + b"\r\n\r\n")
                    slow, fast = (headers + BODY, b"") if self.part == "headers" else (BODY, headers)
                    conn.sendall(fast)
                    for i in range(len(slow)):
                        if self.stop.wait(self.interval):
                            return
                        conn.sendall(slow[i:i + 1])
            except OSError:  # the client gave up and closed the connection: expected
                return

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.sock.close()
        self.thread.join(5)


def judge_with_deadline(base_url: str, **kw) -> OpenAIJudge:
    return OpenAIJudge(base_url, "trickle", load_rubric("helpful"), timeout=DEADLINE, **kw)


def annotate_within(judge, pairs, limit: float):
    """Run ``judge.annotate(pairs)`` in a thread; return (judgments or None if still running, seconds)."""
    out = {}
    worker = threading.Thread(target=lambda: out.update(result=judge.annotate(pairs)), daemon=True)
    t0 = time.perf_counter()
    worker.start()
    worker.join(limit)
    return out.get("result"), time.perf_counter() - t0


PAIR = PairRequest("What is 2 + 2?", "4", "Bananas.", prompt_id="math")


@pytest.mark.parametrize("part", ["headers", "body"])
@pytest.mark.parametrize("max_retries", [0, 3])
def test_trickling_server_is_cut_at_the_deadline(part, max_retries):
    with TrickleServer(part) as server:
        judge = judge_with_deadline(server.base_url, max_retries=max_retries, concurrency=2)
        out, elapsed = annotate_within(judge, [PAIR], DEADLINE + SLACK)
        assert out is not None, f"the judgment was still running after {elapsed:.1f}s (deadline {DEADLINE}s)"
        [j] = out
        assert j.failure == "timeout" and j.prob is None and j.prob_ab is None and not j.ok, j
        assert elapsed < DEADLINE + SLACK
        assert server.requests == 2  # one per order: a timed-out request is not retried past its deadline
        judge.close()


def test_retries_never_sleep_past_the_deadline():
    """A 503 with Retry-After: 30 and max_retries=3 fails as http_503 at once instead of sleeping 90 s."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    count = []

    class Busy(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            count.append(1)
            body = b'{"error": {"message": "busy"}}'
            self.send_response(503)
            for k, v in (("Content-Type", "application/json"), ("Retry-After", "30"), ("Content-Length", str(len(body)))):
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Busy)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        judge = judge_with_deadline(f"http://127.0.0.1:{server.server_address[1]}/v1", max_retries=3)
        out, elapsed = annotate_within(judge, [PAIR], DEADLINE + SLACK)
    finally:
        server.shutdown()
        server.server_close()
    assert out is not None and [j.failure for j in out] == ["http_503"] and elapsed < DEADLINE + SLACK
    assert len(count) == 2  # the 30 s Retry-After would end past the 1.5 s deadline: no retry


def test_a_trickled_pair_is_masked_not_labelled_end_to_end(tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"q{i}", "a": "4", "b": "Bananas."}) + "\n" for i in range(2)))
    out, report = tmp_path / "prefs.jsonl", tmp_path / "report.json"
    with TrickleServer("body") as server:
        t0 = time.perf_counter()
        code = main(["annotate", str(pairs), "--out", str(out), "--report", str(report), "--no-progress",
                     "--set", "type=openai", "--set", f"base_url={server.base_url}",
                     "--set", f"request_timeout={DEADLINE}", "--set", "concurrency=4"])
        elapsed = time.perf_counter() - t0
    # every judgment was cut: masked as timeouts, never a label; with nothing judged the command fails in one line
    assert code == 2
    assert capsys.readouterr().err == "oaif: error: every judgment failed (2 pairs; timeout 2); nothing written\n"
    assert not out.exists() and not report.exists()  # no preference was written from a cut judgment
    assert elapsed < DEADLINE + SLACK + 5  # one deadline for the batch (4 requests in flight) plus start-up
