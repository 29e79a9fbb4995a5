"""Runs the in-process vLLM tests (test_vllm_colocated.py, test_vllm_colocated_trainer.py) in the vLLM environment.

vLLM pins its own transformers, so it is installed in ``.venv-vllm`` rather than next to oaif's
other dependencies; this test starts pytest there, so the main suite covers the colocated
engine too. Where this interpreter imports vLLM itself, pytest collects those files directly.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
from pathlib import Path

import pytest

from helpers import doc_argv
from vllm_helpers import ROOT, require_vllm_python

pytestmark = pytest.mark.slow


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None,
                    reason="vLLM imports here: the colocated tests run in this session")
def test_colocated_engine_tests_pass_in_the_vllm_environment():
    python = require_vllm_python()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    cmd = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "--durations=5",
           *(str(ROOT / "tests" / name) for name in ("test_vllm_colocated.py", "test_vllm_colocated_trainer.py"))]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    tail = (result.stdout + result.stderr)[-4000:]
    assert result.returncode == 0, tail
    summary = result.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary and "failed" not in summary, tail


def test_setup_vllm_finds_the_built_environment_and_says_so():
    # docs/vllm.md's command; on a machine where .venv-vllm is built (CI: by setup.sh --tests) it only checks it
    python = require_vllm_python()
    argv = doc_argv("scripts/setup.sh --vllm")
    if Path(python).resolve() != (ROOT / ".venv-vllm" / "bin" / "python").resolve():
        pytest.skip(f"vLLM comes from {python}, not .venv-vllm: running setup.sh --vllm would build it")
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.fullmatch(r"setup done: \.venv-vllm \(vllm \S+ transformers \S+\)\n", result.stdout), result.stdout
