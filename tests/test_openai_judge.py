"""OpenAIJudge against a real llama.cpp server, and against misbehaving servers on loopback.

The happy path uses the real llama.cpp server (session fixture ``llama_server``). The fault
servers below are hand-written on purpose: they stand in for a misbehaving *remote* server
(HTTP 500/429, garbage bodies, NaN logprobs, hanging, dying mid-batch) that a real local server
cannot be made to produce on demand. They are real processes/threads with real sockets; nothing
in the SDK or the judge is mocked.
"""

from __future__ import annotations

import json
import logging
import math
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from oaif.annotators.base import Annotator, PairRequest
from oaif.annotators.openai_judge import OpenAIJudge
from oaif.annotators.rubrics import load_rubric

pytestmark = pytest.mark.slow

RUBRIC = load_rubric("helpful")

PAIRS = [
    PairRequest("What is the capital of France?", "The capital of France is Paris.",
                "zxq blorp fnord wibble 77 ??", prompt_id="france"),
    PairRequest("What is 2 + 2?", "2 + 2 = 4.", "Bananas are yellow and grow in bunches.", prompt_id="math"),
    PairRequest("Name a primary colour.", "Red is a primary colour.", "I like trains.", prompt_id="colour"),
]


# -- a hand-written OpenAI-compatible fake server (stands in for a misbehaving remote) ----------

def completion(content: str | None, tokens: list | None = None) -> dict:
    """A chat.completion body; ``tokens`` is [(token, logprob, [(top_token, top_logprob), ...]), ...]."""
    logprobs = None
    if tokens is not None:
        logprobs = {"content": [{"token": t, "logprob": lp, "bytes": None,
                                 "top_logprobs": [{"token": tt, "logprob": tl, "bytes": None} for tt, tl in top]}
                                for t, lp, top in tokens], "refusal": None}
    return {"id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": "fake",
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": logprobs,
                         "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


class Reply:
    def __init__(self, status: int = 200, body: object = None, headers: dict | None = None, delay: float = 0.0):
        self.status, self.body, self.headers, self.delay = status, body, headers or {}, delay


class FakeServer:
    """Loopback HTTP server in a thread; ``respond(request_json, headers) -> Reply`` decides each answer.

    Header names are lower-cased.
    """

    def __init__(self, respond):
        self.respond = respond
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.closing = threading.Event()
        self.inflight = 0
        self.max_inflight = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = None
                headers = {k.lower(): v for k, v in self.headers.items()}
                with outer.lock:
                    outer.requests.append({"path": self.path, "headers": headers, "json": body})
                    outer.inflight += 1
                    outer.max_inflight = max(outer.max_inflight, outer.inflight)
                try:
                    self._reply(outer.respond(body, headers))
                finally:
                    with outer.lock:
                        outer.inflight -= 1

            def _reply(self, reply):
                if reply.delay and outer.closing.wait(reply.delay):
                    return
                data = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
                try:
                    self.send_response(reply.status)
                    headers = {"Content-Type": "application/json", **reply.headers}
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass  # a client that timed out and left is expected here

        self.server = Server(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def count(self) -> int:
        with self.lock:
            return len(self.requests)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def judge_for(base_url: str, **kw) -> OpenAIJudge:
    kw.setdefault("max_retries", 0)
    kw.setdefault("timeout", 10.0)
    return OpenAIJudge(base_url, "fake-judge", RUBRIC, **kw)


def user_text(body: dict) -> str:
    return next(m["content"] for m in body["messages"] if m["role"] == "user")


def good_first_judge(body, headers) -> Reply:
    """A deterministic 'judge': prefers the response that contains GOOD, answering 'Answer: <label>'."""
    text = user_text(body)
    first = re.search(r"<response_1>(.*?)</response_1>", text, re.S).group(1)
    label, other = ("1", "2") if "GOOD" in first else ("2", "1")
    top = [(" " + label, math.log(0.6)), (label, math.log(0.2)), (" " + other, math.log(0.15)), (" the", math.log(0.05))]
    return Reply(body=completion(f"Answer: {label}", [("Answer", -0.01, [("Answer", -0.01)]),
                                                       (":", -0.01, [(":", -0.01)]),
                                                       (" " + label, math.log(0.6), top)]))


# -- real llama.cpp server -------------------------------------------------------------------

def test_real_server_judges_from_logprobs(llama_server, capsys):
    # a generous deadline: this test is about the readout, and a loaded CI machine queues four requests
    judge = OpenAIJudge(llama_server.base_url, llama_server.model, RUBRIC, top_logprobs=20, concurrency=4, timeout=300.0)
    assert isinstance(judge, Annotator)
    assert judge.name == f"openai:{llama_server.model}"
    t0 = time.perf_counter()
    out = judge.annotate(PAIRS)
    elapsed = time.perf_counter() - t0
    with capsys.disabled():
        print(f"\n[openai judge on llama.cpp SmolLM2-135M, {len(PAIRS)} pairs, both orders: {elapsed:.2f}s]")
        for r, j in zip(PAIRS, out):
            print(f"  {r.prompt_id:8s} prob={j.prob} ab={j.prob_ab} ba={j.prob_ba} consistent={j.consistent} "
                  f"latency={j.latency_s:.2f}s extra={j.extra}")
    assert len(out) == len(PAIRS)
    for j in out:
        assert j.ok, j
        assert j.judge == judge.name
        assert j.extra["mode"] == "logprobs"
        assert j.prob_ab is not None and j.prob_ba is not None
        assert all(0.0 <= p <= 1.0 for p in (j.prob, j.prob_ab, j.prob_ba))
        assert j.prob == pytest.approx((j.prob_ab + j.prob_ba) / 2)
        assert j.consistent in (True, False)
        assert j.latency_s > 0
    probs = [p for j in out for p in (j.prob_ab, j.prob_ba)]
    assert len(set(probs)) > 1, "all readings identical: logprobs are not being read"
    assert not all(p in (0.0, 1.0) for p in probs), "readings look like text parses, not logprobs"


def test_real_server_one_order_and_default_top_logprobs(llama_server, capsys):
    judge = OpenAIJudge(llama_server.base_url, llama_server.model, RUBRIC, both_orders=False)
    [j] = judge.annotate(PAIRS[:1])
    with capsys.disabled():
        print(f"\n[one order, top_logprobs=5] {j}")
    # With only 5 top logprobs the 135M judge may list only one label: then the reading is a bound.
    if j.ok:
        assert 0.0 <= j.prob <= 1.0 and j.prob_ab == j.prob and j.prob_ba is None and j.consistent is None
        assert j.extra["mode"] in ("logprobs", "text")
    else:
        assert j.failure == "unparseable"


# -- reading rules (deterministic fake judge) ------------------------------------------------

def test_order_mapping_and_result_order():
    pairs = [PairRequest(f"q{i}", *(("GOOD answer", "bad answer") if i % 2 == 0 else ("bad answer", "GOOD answer")),
                         prompt_id=str(i)) for i in range(10)]
    with FakeServer(good_first_judge) as srv:
        out = judge_for(srv.base_url, concurrency=4).annotate(pairs)
        assert srv.count == 20
    # " 1" (0.6) and "1" (0.2) both mean label 1 and are summed: 0.8 vs 0.15.
    p_good = 0.8 / 0.95
    for i, j in enumerate(out):
        assert j.ok, j
        expected = p_good if i % 2 == 0 else 1 - p_good
        assert j.prob_ab == pytest.approx(expected) and j.prob_ba == pytest.approx(expected)
        assert j.prob == pytest.approx(expected) and j.consistent is True
        assert "bound" not in j.extra and j.extra["mode"] == "logprobs"


def test_requests_run_concurrently_with_a_bound():
    def slow(body, headers):
        reply = good_first_judge(body, headers)
        reply.delay = 0.4
        return reply

    pairs = [PairRequest(f"q{i}", "GOOD", "bad") for i in range(4)]
    with FakeServer(slow) as srv:
        t0 = time.perf_counter()
        out = judge_for(srv.base_url, concurrency=8).annotate(pairs)
        elapsed = time.perf_counter() - t0
        assert srv.max_inflight == 8  # all 2N requests of the batch went in together
    assert all(j.ok for j in out) and elapsed < 8 * 0.4
    with FakeServer(slow) as srv:
        out = judge_for(srv.base_url, concurrency=2).annotate(pairs)
        assert srv.max_inflight == 2
    assert all(j.ok for j in out) and all(j.latency_s >= 0.4 for j in out)


def test_one_label_listed_is_a_bound():
    def respond(body, headers):
        top = [("The", -0.5), ("1", -1.0), ("A", -3.0)]
        return Reply(body=completion("The best", [("The", -0.5, top), (" best", -1.0, [(" best", -1.0)])]))

    with FakeServer(respond) as srv:
        [j] = judge_for(srv.base_url).annotate(PAIRS[:1])
    p1 = 1 / (1 + math.exp(-3.0 - -1.0))  # "2" is at most -3.0, the smallest listed logprob
    assert j.ok and j.extra["bound"] is True
    assert j.prob_ab == pytest.approx(p1) and j.prob_ba == pytest.approx(1 - p1)
    assert j.extra["logprobs_ab"] == {"1": -1.0, "2": None}


def test_text_fallback_without_logprobs():
    answers = iter(["Answer: 2", "1"])

    def respond(body, headers):
        return Reply(body=completion(next(answers)))

    with FakeServer(respond) as srv:
        [j] = judge_for(srv.base_url, concurrency=1).annotate(PAIRS[:1])
    assert j.ok and j.extra["mode"] == "text"
    assert j.prob_ab == 0.0 and j.prob_ba == 0.0 and j.prob == 0.0


def test_text_fallback_unparseable_keeps_raw_text(caplog):
    with FakeServer(lambda body, headers: Reply(body=completion("I think reply 1 is better because " + "x" * 500))) as srv:
        with caplog.at_level(logging.WARNING, logger="oaif.annotators"):
            [j] = judge_for(srv.base_url).annotate(PAIRS[:1])
    assert j.failure == "unparseable" and j.prob is None and j.prob_ab is None
    assert j.extra["raw"].startswith("I think reply 1") and len(j.extra["raw"]) <= 200
    assert "unparseable" in caplog.text


# -- faults ------------------------------------------------------------------------------------

def test_refused_port_is_connection_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge = judge_for(f"http://127.0.0.1:{port}/v1", max_retries=1)
    out = judge.annotate(PAIRS)
    assert [j.failure for j in out] == ["connection_error"] * len(PAIRS)
    assert all(j.prob is None and j.prob_ab is None and j.prob_ba is None for j in out)


NAN_TOP = [("1", float("nan")), ("2", -1.0)]
FAULTS = {
    # name: (reply, expected failure, retried by the SDK)
    "http_500": (Reply(500, {"error": {"message": "boom"}}, {"retry-after-ms": "5"}), "http_500", True),
    "http_429": (Reply(429, {"error": {"message": "slow down"}}, {"retry-after-ms": "5"}), "http_429", True),
    "http_400": (Reply(400, {"error": {"message": "bad request"}}), "http_400", False),
    "garbage_json": (Reply(200, b"<html>this is not json</html>"), "bad_response", False),
    "garbage_text": (Reply(200, b"hello", {"Content-Type": "text/plain"}), "bad_response", False),
    "wrong_shape": (Reply(200, {"hello": "world"}), "bad_response", False),
    "no_choices": (Reply(200, {**completion("1"), "choices": []}), "bad_response", False),
    "message_not_object": (Reply(200, {**completion("1"), "choices": [{"index": 0, "message": 5}]}),
                           "bad_response", False),
    "nan_logprob": (Reply(200, completion("1", [("1", float("nan"), NAN_TOP)])), "nan", False),
    "inf_logprob": (Reply(200, completion("1", [("1", -0.1, [("1", -0.1), ("2", float("-inf"))])])), "nan", False),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_faulty_server_is_masked(fault, caplog):
    reply, reason, retried = FAULTS[fault]
    max_retries = 2
    with FakeServer(lambda body, headers: reply) as srv:
        with caplog.at_level(logging.WARNING, logger="oaif.annotators"):
            out = judge_for(srv.base_url, max_retries=max_retries).annotate(PAIRS[:2])
        received = srv.count
    assert [j.failure for j in out] == [reason, reason], [j.extra for j in out]
    assert all(j.prob is None and j.prob_ab is None and j.prob_ba is None and not j.ok for j in out)
    requests = 2 * 2  # two pairs, both orders
    assert received == requests * (1 + max_retries if retried else 1)
    assert caplog.text.count(reason) >= 2


def test_one_failed_order_fails_the_pair():
    def respond(body, headers):
        if "<response_1>\nGOOD" in user_text(body):
            return Reply(503, {"error": {"message": "down"}})
        return good_first_judge(body, headers)

    with FakeServer(respond) as srv:
        [j] = judge_for(srv.base_url).annotate([PairRequest("q", "bad answer", "GOOD answer")])
    assert j.failure == "http_503" and j.prob is None and j.extra["order"] == "ba"


def test_timeout():
    with FakeServer(lambda body, headers: Reply(body=completion("1"), delay=5.0)) as srv:
        t0 = time.perf_counter()
        out = judge_for(srv.base_url, timeout=0.5, max_retries=0).annotate(PAIRS[:2])
        elapsed = time.perf_counter() - t0
    assert [j.failure for j in out] == ["timeout", "timeout"]
    assert all(j.prob is None for j in out)
    assert elapsed < 4.0


# A fake server in its own process, so it can be killed -9 mid-batch: it answers requests about
# France at once with a valid judgment, and accepts every other request but never answers it.
DYING_SERVER = textwrap.dedent("""
    import json, sys, threading, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    lock = threading.Lock()
    seen = [0]
    BODY = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "fake",
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "1"},
                     "logprobs": {"content": [{"token": "1", "logprob": -0.2, "bytes": None,
                        "top_logprobs": [{"token": "1", "logprob": -0.2, "bytes": None},
                                         {"token": "2", "logprob": -1.8, "bytes": None}]}]}}]}).encode()
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def log_message(self, *a): pass
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            with lock:
                seen[0] += 1
                print("REQ", seen[0], flush=True)
            if b"capital of France" not in body:
                time.sleep(600)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY)
    srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
    srv.daemon_threads = True
    print("PORT", srv.server_address[1], flush=True)
    srv.serve_forever()
""")


def test_server_killed_mid_batch():
    proc = subprocess.Popen([sys.executable, "-c", DYING_SERVER], stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline().split()[1])
        # concurrency 2: pair 0's two orders go first and are answered; then both workers hang on
        # pair 1's orders, in flight when the server dies; pairs 2 and 3 (the latter is pair 0's
        # prompt again, which the server would answer) are sent after it is gone.
        judge = judge_for(f"http://127.0.0.1:{port}/v1", concurrency=2, max_retries=0, timeout=30.0)
        result = {}
        worker = threading.Thread(target=lambda: result.update(out=judge.annotate(PAIRS + PAIRS[:1])))
        worker.start()
        deadline = time.monotonic() + 20
        seen = 0
        while seen < 4 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if line.startswith("REQ"):
                seen = int(line.split()[1])
        assert seen == 4, "requests never reached the server"
        time.sleep(0.2)
        proc.kill()
        proc.wait(5)
        worker.join(30)
        assert not worker.is_alive()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    out = result["out"]
    assert out[0].ok and out[0].prob is not None
    for j in out[1:]:
        assert j.failure in ("connection_error", "timeout"), j
        assert j.prob is None and j.prob_ab is None and j.prob_ba is None


# -- the API key -------------------------------------------------------------------------------

def test_api_key_is_sent_but_never_shown(monkeypatch, caplog):
    key = "sk-test-SECRET-0123456789abcdef"
    monkeypatch.setenv("OAIF_TEST_JUDGE_KEY", key)

    def respond(body, headers):
        # The second pair gets a 500 whose body echoes the Authorization header (a careless server):
        # the judge must still keep the key out of logs and diagnostics.
        if "wibble" in user_text(body):
            return Reply(500, {"error": {"message": f"rejected {headers.get('authorization')}"}})
        return good_first_judge(body, headers)

    with FakeServer(respond) as srv:
        judge = judge_for(srv.base_url, api_key_env="OAIF_TEST_JUDGE_KEY")
        with caplog.at_level(logging.DEBUG):
            out = judge.annotate([PairRequest("q", "GOOD answer", "bad answer"), PAIRS[0]])
        auth = {r["headers"].get("authorization") for r in srv.requests}
    assert auth == {f"Bearer {key}"}
    assert out[0].ok and out[1].failure == "http_500"
    assert "***" in out[1].extra["error"]
    shown = [caplog.text, repr(judge), str(judge), repr(out), json.dumps([j.extra for j in out], default=str)]
    for text in shown:
        assert key not in text
        assert "SECRET" not in text


def test_missing_key_env_sends_placeholder(monkeypatch):
    monkeypatch.delenv("OAIF_TEST_JUDGE_KEY", raising=False)
    with FakeServer(good_first_judge) as srv:
        [j] = judge_for(srv.base_url, api_key_env="OAIF_TEST_JUDGE_KEY").annotate([PairRequest("q", "GOOD", "bad")])
        assert {r["headers"].get("authorization") for r in srv.requests} == {"Bearer not-needed"}
    assert j.ok


def test_empty_batch_and_bad_arguments():
    judge = judge_for("http://127.0.0.1:9/v1")
    assert judge.annotate([]) == []
    from oaif.errors import AnnotatorError

    with pytest.raises(AnnotatorError):
        judge_for("http://127.0.0.1:9/v1", concurrency=0)
    with pytest.raises(AnnotatorError):
        judge_for("http://127.0.0.1:9/v1", top_logprobs=0)


# -- credentials inside the URL ------------------------------------------------------------------

def shorter_judge(body, headers) -> Reply:
    """Prefers the shorter response (then the alphabetically first), the same in both orders."""
    text = user_text(body)
    first, second = (re.search(rf"<response_{i}>(.*?)</response_{i}>", text, re.S).group(1) for i in (1, 2))
    label = "1" if (len(first), first) < (len(second), second) else "2"
    top = [(" " + label, math.log(0.9)), (" " + ("2" if label == "1" else "1"), math.log(0.1))]
    return Reply(body=completion(f"Answer: {label}", [("Answer", -0.01, [("Answer", -0.01)]), (":", -0.01, [(":", -0.01)]),
                                                       (" " + label, math.log(0.9), top)]))


def test_credentials_in_base_url_reach_no_file_and_no_output(tiny_model_dir, tmp_path):
    import base64
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    secret = "S3cretPassw0rd"
    leaks = (secret, base64.b64encode(f"alice:{secret}".encode()).decode())
    seen = []

    def respond(body, headers):
        seen.append(headers.get("authorization"))
        if len(seen) == 1:  # a careless server echoes the Authorization header into its error
            return Reply(500, {"error": {"message": f"rejected {headers.get('authorization')}"}})
        return shorter_judge(body, headers)

    out, report, pairs = tmp_path / "run", tmp_path / "annotate.json", tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Question {i}?", "a": "Yes." * (i + 1), "b": "No."}) + "\n"
                             for i in range(2)))
    outputs = []
    with FakeServer(respond) as server:
        url = server.base_url.replace("http://", f"http://alice:{secret}@")
        common = [str(root / "configs/demo.yaml"), f"model.name_or_path={tiny_model_dir}", f"train.output_dir={out}",
                  "annotator.type=openai", f"annotator.base_url={url}", "annotator.model=fake", "annotator.max_retries=0",
                  "train.batch_size=2", "sampling.max_new_tokens=6", "logging.progress_bar=false", "train.device=cpu"]
        for argv in (["train", *common, "train.max_steps=1"],
                     ["train", *common, "train.max_steps=2", "train.resume=true"],  # the saved config is compared
                     ["config", "show", *common, f"vllm.server_url={url}"],
                     ["train", *common, "train.max_steps=3", "train.resume=true", "sampling.backend=vllm",
                      "vllm.mode=server", f"vllm.server_url=http://alice:{secret}@127.0.0.1:9"],  # an error naming it
                     ["-v", "annotate", str(pairs), "--out", str(tmp_path / "prefs.jsonl"),
                      "--report", str(report), "--limit", "2", "--no-progress", "--set", "type=openai",
                      "--set", f"base_url={url}", "--set", "model=fake", "--set", "max_retries=0"]):
            proc = subprocess.run([sys.executable, "-m", "oaif.cli", *argv], capture_output=True, text=True, timeout=300,
                                  cwd=root)
            outputs.append(proc)
    assert [p.returncode for p in outputs] == [0, 0, 0, 2, 0], [p.stderr[-2000:] for p in outputs]
    assert "oaif: error: cannot reach the vLLM server at http://***@127.0.0.1:9" in outputs[3].stderr
    assert f"base_url: {url.replace(f'alice:{secret}', '***')}" in outputs[2].stdout
    assert f"Basic {leaks[1]}" in seen and "rejected Basic ***" in outputs[0].stderr  # it was sent, and echoed
    for proc in outputs:
        for leak in leaks:
            assert leak not in proc.stdout + proc.stderr, proc.args
    files = [p for p in [*out.rglob("*"), report] if p.is_file()]
    assert {"config.yaml", "trainer_state.pt", "trainer_state.json", "annotate.json"} <= {p.name for p in files}
    for path in files:
        data = path.read_bytes()
        assert not any(leak.encode() in data for leak in leaks), path
