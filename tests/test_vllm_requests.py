"""What every vLLM request carries: one seeded row per sample, oaif's stop rule only, no hidden filter.

Runs without vLLM (main environment); the engine and server tests check the same rules end to end."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from oaif.config import VllmConfig, load_config
from oaif.errors import ConfigError
from oaif.generation.base import GenerationError, StopRules, regroup, request_params, sample_rows
from oaif.step.sampling import row_seed

ROOT = Path(__file__).resolve().parent.parent


def test_stop_rule_cuts_at_the_first_eos_and_keeps_it():
    stop = StopRules(frozenset({2, 7}))
    assert stop.cut([5, 6, 7, 2, 9]) == ([5, 6, 7], True)
    assert stop.cut([5, 6]) == ([5, 6], False)
    assert stop.cut([]) == ([], False)
    with pytest.raises(GenerationError):
        StopRules(frozenset())


def test_rows_are_seeded_by_stream_position_and_sample_index():
    rows = sample_rows([[1, 2], [3]], [40, 7], k=2, seed=9)
    assert [(r.b, r.k, r.prompt) for r in rows] == [(0, 0, [1, 2]), (0, 1, [1, 2]), (1, 0, [3]), (1, 1, [3])]
    assert [r.seed for r in rows] == [row_seed(9, 40, 0), row_seed(9, 40, 1), row_seed(9, 7, 0), row_seed(9, 7, 1)]
    # a prompt's seeds do not depend on the other prompts in the call
    assert [r.seed for r in sample_rows([[3]], [7], k=2, seed=9)] == [rows[2].seed, rows[3].seed]
    with pytest.raises(ValueError):
        sample_rows([[1]], [1, 2], k=2, seed=0)


def test_regroup_puts_each_output_back_in_its_row():
    stop = StopRules(frozenset({2}))
    rows = sample_rows([[1], [1]], [0, 1], k=2, seed=0)
    responses, ended = regroup(rows, [[5, 2, 6], [5], [2], [6, 6]], stop, num_prompts=2, k=2)
    assert responses == [[[5, 2], [5]], [[2], [6, 6]]]
    assert ended == [[True, False], [True, False]]


def test_request_params_set_every_filter_and_only_oaif_stop_ids():
    stop = StopRules(frozenset({7, 2}))
    p = request_params(123, 0.9, 0.95, 64, stop)
    assert p == dict(n=1, temperature=0.9, top_p=0.95, top_k=0, min_p=0.0, repetition_penalty=1.0,
                     presence_penalty=0.0, frequency_penalty=0.0, max_tokens=64, stop_token_ids=[2, 7],
                     ignore_eos=True, seed=123)
    greedy = request_params(123, 1e-7, 0.5, 8, stop)
    assert greedy["temperature"] == 0.0 and greedy["top_p"] == 1.0 and greedy["seed"] is None


@pytest.mark.parametrize("override, key", [(dict(mode="remote"), "vllm.mode"), (dict(kv_cache_gib=0), "vllm.kv_cache_gib"),
                                           (dict(dtype="int8"), "vllm.dtype"), (dict(max_model_len=-1), "vllm.max_model_len")])
def test_bad_settings_name_their_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        VllmConfig(**override).validate()


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_colocated_engine_without_vllm_says_how_to_install_it(tmp_path):
    from oaif.generation.vllm_colocated import ColocatedVllm

    with pytest.raises(GenerationError, match=r"needs vLLM.*setup.sh --vllm"):
        ColocatedVllm(str(tmp_path), StopRules(frozenset({2})), max_model_len=64)


def test_build_generator_picks_the_mode(tmp_path):
    from oaif.generation.build import build_generator

    common = dict(model_path=str(tmp_path), eos_ids={2}, max_model_len=64, policy_dtype=None, seed=0,
                  output_dir=str(tmp_path))
    with pytest.raises(GenerationError, match="cannot reach the vLLM server at http://127.0.0.1:9"):
        build_generator(VllmConfig(mode="server", server_url="http://127.0.0.1:9", request_timeout_s=5), **common)
    with pytest.raises(ConfigError, match="vllm.mode"):
        build_generator(VllmConfig(mode="both"), **common)


def test_importing_oaif_and_its_generation_package_does_not_import_vllm():
    code = ("import sys, oaif, oaif.generation, oaif.generation.build, oaif.generation.vllm_server, "
            "oaif.generation.vllm_colocated, oaif.generation.vllm_worker; "
            "print(sorted(m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def oaif_train(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "oaif.cli", "train", str(ROOT / "configs" / "vllm_demo.yaml"),
                           "annotator.type=callable", "annotator.callable=oaif.annotators.rules:prefer_shorter",
                           *overrides], capture_output=True, text=True, cwd=ROOT, timeout=300)


@pytest.mark.parametrize("mode, message", [
    pytest.param("colocated", "the vLLM backend needs vLLM, which is not installed here", id="colocated_without_vllm",
                 marks=pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")),
    pytest.param("server", "cannot reach the vLLM server at http://127.0.0.1:9", id="server_unreachable"),
])
def test_a_vllm_run_that_cannot_sample_stops_with_one_line(tiny_model_dir, tmp_path, mode, message):
    result = oaif_train(f"model.name_or_path={tiny_model_dir}", f"train.output_dir={tmp_path}", f"vllm.mode={mode}",
                        "vllm.server_url=http://127.0.0.1:9", "vllm.request_timeout_s=5")
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("oaif: error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


# -- several processes with colocated engines: each on its own device ------------------------------
def test_one_process_keeps_the_default_executor():
    from oaif.generation.vllm_colocated import engine_placement

    for device in ("cpu", "cuda", "cuda:0"):
        placement = engine_placement(device)
        assert placement.device == torch.device(device) and placement.engine_args == {} and placement.env == {}


def test_several_cpu_processes_run_the_executor_several_gpus_run():
    from oaif.generation.vllm_colocated import engine_placement

    placement = engine_placement("cpu", process_index=1, local_process_index=1, num_processes=2)
    assert placement.device == torch.device("cpu")  # the two-process CPU runs (test_vllm_trainer.py) run it
    assert placement.engine_args == {"distributed_executor_backend": "external_launcher"}
    assert placement.env == {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}


@pytest.mark.parametrize("rank, local_rank, world", [(0, 0, 2), (1, 1, 2), (9, 1, 16)], ids=["main", "second", "node2"])
def test_several_gpu_processes_each_get_an_engine_on_their_own_device(rank, local_rank, world):
    from oaif.generation.vllm_colocated import engine_placement

    placement = engine_placement(torch.device("cuda", local_rank), process_index=rank, local_process_index=local_rank,
                                 num_processes=world)
    assert placement.device == torch.device("cuda", local_rank)  # not cuda:0 for all, as the default executor would
    assert placement.engine_args == {"distributed_executor_backend": "external_launcher"}
    assert placement.env == {"RANK": str(rank), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(world)}


def test_an_engine_elsewhere_than_its_policy_is_one_line():
    from oaif.generation.vllm_colocated import engine_placement

    with pytest.raises(GenerationError, match=r"^process 1 trains on cuda:0 but its local rank is 1: .*vllm.mode=server$"):
        engine_placement("cuda:0", process_index=1, local_process_index=1, num_processes=2)


def test_the_startup_utilization_passes_vllms_free_memory_check_whatever_the_trainer_holds():
    import math

    from oaif.generation.vllm_colocated import startup_utilization

    total = 143_771_000_000  # an H200's memory
    assert startup_utilization(total, total) == 0.92  # a free device: vLLM's default
    assert startup_utilization(int(0.5 * total), total) == 0.49
    for share in range(3, 101):  # vLLM 0.32 (v1/worker/utils.py request_memory) refuses unless this holds
        free = int(total * share / 100) - 1
        assert math.ceil(total * startup_utilization(free, total)) <= free, share
    with pytest.raises(GenerationError, match=r"^a colocated vLLM engine needs GPU memory, but 1.00 of 133.90 GiB"):
        startup_utilization(2**30, total)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here: it would start")
def test_colocated_engines_on_several_gpus_are_built_not_refused(tiny_model_dir):
    from oaif.generation.build import build_sampler
    from oaif.models.load import load_causal_lm

    class SecondOfTwoGpus:  # stands in for a two-GPU accelerator, which this machine lacks; only these are read
        num_processes, process_index, local_process_index, device = 2, 1, 1, torch.device("cuda", 1)

    cfg = load_config(ROOT / "configs" / "vllm_demo.yaml", [f"model.name_or_path={tiny_model_dir}"])
    policy, tok = load_causal_lm(tiny_model_dir)
    # the engine is built (and here stops at the missing vLLM), no longer refused for several GPUs
    with pytest.raises(GenerationError, match="the vLLM backend needs vLLM"):
        build_sampler(cfg, policy, tok, {2}, SecondOfTwoGpus())


@pytest.mark.parametrize("precision, weights, engine", [
    ("train.mixed_precision=no", torch.float32, "float32"),
    ("train.mixed_precision=bf16", torch.float32, "bfloat16"),  # the policy computes in bf16: so does the engine
    ("train.mixed_precision=no", torch.bfloat16, "bfloat16"),
])
def test_an_auto_engine_samples_in_the_dtype_the_policy_computes_in(precision, weights, engine):
    from oaif.generation.build import policy_compute_dtype
    from oaif.generation.vllm_colocated import engine_dtype

    cfg = load_config(ROOT / "configs" / "vllm_demo.yaml", [precision])
    policy = torch.nn.Linear(2, 2).to(weights)
    assert engine_dtype(cfg.vllm, policy_compute_dtype(cfg, policy)) == engine
    assert engine_dtype(VllmConfig(dtype="float32"), policy_compute_dtype(cfg, policy)) == "float32"  # explicit wins


# --------------------------------------------------------------------------- misbehaving servers
# A real vLLM server cannot be made to send string or out-of-vocabulary token ids, empty or over-long
# completions, or to die in the middle of an answer: these servers on loopback are hand-written for that.
# The client, urllib and the sockets are real.

VOCAB = 100


class FakeVllm:
    """Answers ``GET /v1/models`` with one model, every ``POST /v1/completions`` with ``answer(body)``: a list
    of token ids, or ``"die"`` (headers promise a body, half of it comes, the connection closes), and
    accepts every other ``POST`` (weight reloads)."""

    def __init__(self, answer):
        import http.server
        import threading

        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, payload: dict, cut: bool = False):
                raw = json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw[: len(raw) // 2] if cut else raw)
                self.wfile.flush()
                if cut:
                    self.close_connection = True

            def do_GET(self):
                self._send({"object": "list", "data": [{"id": "fake", "object": "model"}]})

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                body = json.loads(raw) if raw else {}
                if self.path != "/v1/completions":  # a weight reload, a prefix cache reset: accepted
                    return self._send({})
                tokens = fake.answer(body)
                extra = {}
                if isinstance(tokens, dict):  # the token ids and more fields of the choice (logprobs)
                    extra, tokens = tokens, tokens["token_ids"]
                self._send({"choices": [{"index": 0, "text": "", **extra,
                                         "token_ids": [] if tokens == "die" else tokens}]}, cut=tokens == "die")

        self.answer = answer
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def misbehaving_client(server: FakeVllm, tmp_path):
    from oaif.generation.vllm_server import VllmServer

    return VllmServer(StopRules(frozenset({2})), VllmConfig(mode="server", server_url=server.url, request_timeout_s=5),
                      weights_dir=tmp_path, vocab_size=VOCAB)


@pytest.mark.parametrize("answer, message", [
    (lambda body: ["5", "6"], r"token_ids that are not token ids: \['5', '6'\]"),
    (lambda body: [5, 6.5], r"token_ids that are not token ids: \[5, 6\.5\]"),
    (lambda body: [5, VOCAB], rf"token id {VOCAB} outside the model's vocabulary \(0-{VOCAB - 1}\)"),
    (lambda body: [-1], r"token id -1 outside the model's vocabulary"),
    (lambda body: [], r"an empty completion \(no token\)"),
    (lambda body: [7] * (body["max_tokens"] + 1), r"9 tokens, more than the max_tokens=8 it was asked for"),
    (lambda body: "die", r"the connection broke in the middle of the answer to POST /v1/completions"),
], ids=["strings", "floats", "past_vocab", "negative", "empty", "too_long", "died"])
def test_a_misbehaving_vllm_server_is_one_line(tmp_path, answer, message):
    with FakeVllm(answer) as server:
        client = misbehaving_client(server, tmp_path)
        with pytest.raises(GenerationError, match=r"the vLLM server at http://127\.0\.0\.1:\d+.*" + message) as info:
            client.sample([[1, 2, 3]], [0], k=2, seed=0, temperature=1.0, top_p=1.0, max_new_tokens=8)
        assert "\n" not in str(info.value)
    with FakeVllm(lambda body: [7, 8, 2]) as server:  # a sane answer passes
        assert misbehaving_client(server, tmp_path).sample([[1]], [0], k=1, seed=0, temperature=1.0, top_p=1.0,
                                                           max_new_tokens=8) == ([[[7, 8, 2]]], [[True]])


@pytest.mark.parametrize("url", ["notaurl", "ftp://127.0.0.1:9"])
def test_a_server_url_that_is_not_an_http_url_is_one_line(tiny_model_dir, tmp_path, url):
    result = oaif_train(f"model.name_or_path={tiny_model_dir}", f"train.output_dir={tmp_path}", "vllm.mode=server",
                        f"vllm.server_url={url}")
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("oaif: error:")]
    assert len(errors) == 1 and f"vllm.server_url={url}: not an http(s) URL" in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("answer, message", [
    (lambda body: [], "an empty completion"),
    (lambda body: "die", "the connection broke in the middle of the answer"),
], ids=["empty", "died"])
def test_a_run_on_a_misbehaving_vllm_server_stops_with_one_line(tiny_model_dir, tmp_path, answer, message):
    with FakeVllm(answer) as server:
        result = oaif_train(f"model.name_or_path={tiny_model_dir}", f"train.output_dir={tmp_path / 'run'}",
                            "vllm.mode=server", f"vllm.server_url={server.url}", f"vllm.weights_dir={tmp_path / 'w'}",
                            "vllm.request_timeout_s=5", "train.max_steps=1", "train.device=cpu")
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("oaif: error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


NOT_ONE_PER_TOKEN = r"returned token_logprobs that are not one number per token: "


def with_logprobs(tokens, logprobs) -> dict:
    return {"token_ids": tokens, "logprobs": {"token_logprobs": logprobs}}


@pytest.mark.parametrize("answer, message", [
    (lambda body: {"token_ids": [7, 2]}, r"returned no logprobs\.token_logprobs"),
    (lambda body: with_logprobs([7, 2], [-1.0]), NOT_ONE_PER_TOKEN + r"\[-1\.0\]"),
    (lambda body: with_logprobs([7, 2], [-1.0, None]), NOT_ONE_PER_TOKEN + r"\[-1\.0, None\]"),
], ids=["missing", "too_few", "null"])
def test_a_server_whose_logprobs_are_missing_or_wrong_is_one_line(tmp_path, answer, message):
    with FakeVllm(answer) as server:
        with pytest.raises(GenerationError, match=r"the vLLM server at http://127\.0\.0\.1:\d+ " + message) as info:
            misbehaving_client(server, tmp_path).sample([[1]], [0], k=1, seed=0, temperature=1.0, top_p=1.0,
                                                        max_new_tokens=8, logprobs=True)
        assert "\n" not in str(info.value)


def test_the_client_asks_for_the_sampled_tokens_logprobs_and_cuts_them_with_the_response(tmp_path):
    asked = []

    def answer(body):
        asked.append(body)
        return with_logprobs([7, 2, 9], [-0.5, -1.5, -2.5])  # a stop id (2) before the end: cut after it

    with FakeVllm(answer) as server:
        client = misbehaving_client(server, tmp_path)
        out = client.sample([[1]], [0], k=2, seed=0, temperature=0.7, top_p=0.9, max_new_tokens=8, logprobs=True)
        assert out == ([[[7, 2], [7, 2]]], [[True, True]], [[[-0.5, -1.5], [-0.5, -1.5]]])
        assert asked[0]["logprobs"] == 0 and asked[0]["return_tokens_as_token_ids"] is True
        asked.clear()
        assert len(client.sample([[1]], [0], k=1, seed=0, temperature=1.0, top_p=1.0, max_new_tokens=8)) == 2
        assert "logprobs" not in asked[0]  # not asked for: not requested
