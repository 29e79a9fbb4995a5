"""A real vLLM server on loopback samples what the transformers backend samples, before and after a reload.

The server runs from the vLLM environment (``vllm_helpers.vllm_python``); this test and the
client run in any environment: the client speaks HTTP only.
"""

from __future__ import annotations

import pytest

from oaif.config import VllmConfig
from oaif.generation.base import GenerationError, StopRules
from oaif.generation.vllm_server import VllmServer
from oaif.generation.weights import policy_weights
from oaif.models.chat import encode_prompt
from oaif.models.load import load_causal_lm
from oaif.step.sampling import eos_token_ids
from llama_server import free_port
from vllm_helpers import PROMPTS, copy_weights_, greedy_both

pytestmark = pytest.mark.slow


@pytest.fixture
def client(vllm_tiny, vllm_server, tmp_path):
    return VllmServer(StopRules(frozenset(vllm_tiny.eos_ids)), VllmConfig(mode="server", server_url=vllm_server.url),
                      weights_dir=tmp_path / "vllm_weights")


def test_server_greedy_matches_transformers_before_and_after_a_reload(vllm_tiny, client):
    model, tok = load_causal_lm(vllm_tiny.first)
    assert eos_token_ids(model, tok) == vllm_tiny.eos_ids
    prompts = [encode_prompt(tok, p) for p in PROMPTS]
    assert client.model == "policy"
    client.load_weights(policy_weights(model))  # the server is shared by the session: start from the first policy
    hf, vl = greedy_both(model, tok, client, prompts)
    assert vl == hf
    ended = vl[1]
    assert any(e for es in ended for e in es) and not all(e for es in ended for e in es)

    copy_weights_(model, load_causal_lm(vllm_tiny.second)[0])  # every weight changes, tied embeddings included
    client.load_weights(policy_weights(model))
    hf_after, vl_after = greedy_both(model, tok, client, prompts)
    assert vl_after == hf_after
    assert vl_after[0] != vl[0]

    args = dict(temperature=1.0, top_p=0.9, max_new_tokens=10)
    together = client.sample(prompts, [30, 31, 32], k=2, seed=3, **args)
    assert client.sample(prompts[2:], [32], k=2, seed=3, **args)[0][0] == together[0][2]
    assert client.sample(prompts[:1], [30], k=2, seed=4, **args)[0][0] != together[0][0]


def test_unreachable_server_is_a_one_line_error(vllm_tiny, tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(GenerationError, match=rf"cannot reach the vLLM server at {url} \(GET /v1/models\)"):
        VllmServer(StopRules(frozenset(vllm_tiny.eos_ids)), VllmConfig(mode="server", server_url=url), weights_dir=tmp_path)


def test_a_server_without_reloads_is_named(vllm_tiny, llama_server, tmp_path):
    # llama.cpp speaks the OpenAI API but has no weight reload endpoint, like vLLM without dev mode
    url = llama_server.base_url.removesuffix("/v1")
    client = VllmServer(StopRules(frozenset(vllm_tiny.eos_ids)), VllmConfig(mode="server", server_url=url), weights_dir=tmp_path)
    model, _ = load_causal_lm(vllm_tiny.first)
    with pytest.raises(GenerationError, match="VLLM_SERVER_DEV_MODE=1"):
        client.load_weights(policy_weights(model))


# -- vllm.weight_sync=collective: the same pushes through a process group, no file -------------------

def collective_client(vllm_tiny, url: str, weights_dir, **settings) -> VllmServer:
    return VllmServer(StopRules(frozenset(vllm_tiny.eos_ids)),
                      VllmConfig(mode="server", server_url=url, weight_sync="collective", **{"sync_timeout_s": 60, **settings}),
                      weights_dir=weights_dir)


def test_collective_pushes_give_transformers_greedy_and_write_no_file(vllm_tiny, vllm_server, tmp_path):
    client = collective_client(vllm_tiny, vllm_server.url, tmp_path / "vllm_weights", sync_bucket_mib=1)
    model, tok = load_causal_lm(vllm_tiny.first)
    prompts = [encode_prompt(tok, p) for p in PROMPTS]
    try:
        client.load_weights(policy_weights(model))  # forms the group, then the first push (many 1 MiB buckets)
        hf, vl = greedy_both(model, tok, client, prompts)
        assert vl == hf
        copy_weights_(model, load_causal_lm(vllm_tiny.second)[0])  # every weight changes, tied embeddings included
        client.load_weights(policy_weights(model))  # the same group again
        hf_after, vl_after = greedy_both(model, tok, client, prompts)
        assert vl_after == hf_after and vl_after[0] != vl[0]
    finally:
        client.close()
    assert not (tmp_path / "vllm_weights").exists()

    # a new client (a restarted trainer) forms a new group with the same server
    again = collective_client(vllm_tiny, vllm_server.url, tmp_path / "vllm_weights")
    try:
        first = load_causal_lm(vllm_tiny.first)[0]
        again.load_weights(policy_weights(first))
        assert greedy_both(first, tok, again, prompts)[1] == vl
    finally:
        again.close()


def test_collective_on_a_server_without_the_endpoint_is_one_line(vllm_tiny, llama_server, tmp_path):
    url = llama_server.base_url.removesuffix("/v1")
    client = collective_client(vllm_tiny, url, tmp_path)
    model, _ = load_causal_lm(vllm_tiny.first)
    with pytest.raises(GenerationError, match="VLLM_SERVER_DEV_MODE=1") as e:
        client.load_weights(policy_weights(model))
    assert "\n" not in str(e.value)


def test_collective_port_in_use_names_the_key(vllm_tiny, vllm_server, tmp_path):
    import socket

    from oaif.errors import ConfigError

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        client = collective_client(vllm_tiny, vllm_server.url, tmp_path, sync_port=port)
        model, _ = load_causal_lm(vllm_tiny.first)
        with pytest.raises(ConfigError, match=rf"vllm.sync_port={port}: .*address already in use"):
            client.load_weights(policy_weights(model))


def test_collective_sync_host_not_of_this_machine_names_the_key(vllm_tiny, vllm_server, tmp_path):
    from oaif.errors import ConfigError

    # 192.0.2.1 (TEST-NET-1) is no address of this machine: the trainer cannot host the group's store there
    client = collective_client(vllm_tiny, vllm_server.url, tmp_path, sync_host="192.0.2.1", sync_timeout_s=2)
    model, _ = load_causal_lm(vllm_tiny.first)
    with pytest.raises(ConfigError, match=r"vllm.sync_host=192\.0\.2\.1: cannot host") as e:
        client.load_weights(policy_weights(model))
    assert "\n" not in str(e.value)
