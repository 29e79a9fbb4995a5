"""scripts/setup.sh's guard for the llama.cpp build: the tests' annotator server must answer logprobs
requests. On a CPU with AMX, llama-cpp-python built for the machine crashed (SIGSEGV in
ggml_backend_amx_mul_mat) on the first request that asked for logprobs; setup checks the build with
one such request and rebuilds it with the CPU's instruction sets named one by one and AMX left out."""

from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SETUP = ROOT / "scripts" / "setup.sh"


def _function(name: str) -> str:
    """The text of a bash function of setup.sh (from ``name() {`` to the first ``}`` line)."""
    lines = SETUP.read_text().splitlines()
    start = lines.index(f"{name}() {{")
    return "\n".join(lines[start:lines.index("}", start) + 1])


def _call(name: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", f"{_function(name)}\n{name}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_the_rebuild_flags_name_this_cpus_sets_and_never_amx():
    flags = _call("llama_portable_flags").stdout.split()
    assert flags[0] == "-DGGML_NATIVE=OFF"
    assert not any("AMX" in f for f in flags)
    cpu = open("/proc/cpuinfo").read() if Path("/proc/cpuinfo").exists() else ""
    have = set(re.search(r"^flags\s*:(.*)$", cpu, re.M).group(1).split()) if "flags" in cpu else set()
    for cpu_flag, option in (("avx2", "AVX2"), ("avx512f", "AVX512"), ("fma", "FMA")):
        assert f"-DGGML_{option}={'ON' if cpu_flag in have else 'OFF'}" in flags


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None or not (ROOT / ".venv" / "bin" / "python").exists(),
                    reason="llama-cpp-python is installed by scripts/setup.sh --tests")
def test_the_installed_llama_cpp_answers_a_logprobs_request():
    # the same check setup.sh makes; the crash it guards against kills the child, so this fails on it
    result = _call("llama_works")
    assert result.returncode == 0, f"llama.cpp failed a logprobs request (status {result.returncode}): " \
                                   "run scripts/setup.sh --tests to rebuild it"
