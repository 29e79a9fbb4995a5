"""scripts/gpu_check.sh: the GPU self-check. Without a GPU it must say so in one line; its dry run
lists every check; and every oaif command, config key, test file and benchmark flag it names must
exist, so that the script cannot rot before the next GPU runs it."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import doc_argv
from oaif.cli import build_parser
from oaif.config import Config, flatten, load_config

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
CHECKS = ["pytest_trainer", "train_cli", "vllm_colocated", "pytest_vllm_colocated", "vllm_server", "vllm_server_disk",
          "vllm_collective", "pytest_vllm_server", "fsdp", "bench_smollm2", "colocated_2gpu", "bench_qwen"]
KEY = re.compile(r"^([a-z_]+(?:\.[a-z_]+)+)=(.*)$")


def run_script(*args: str, **env: str) -> subprocess.CompletedProcess:
    environment = dict(os.environ, OAIF_PYTHON=sys.executable, **env)
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=environment, cwd=ROOT,
                          timeout=120)


@pytest.fixture(scope="module")
def dry_run() -> dict[str, list[str]]:
    result = run_script(*doc_argv("scripts/gpu_check.sh --dry-run")[1:])  # docs/scaling.md
    assert result.returncode == 0 and result.stderr == "", result.stderr
    commands = {}
    for line in result.stdout.splitlines():
        name, command = line.split(": ", 1)
        commands[name] = shlex.split(command)
    return commands


def test_without_a_gpu_it_says_so_in_one_line_and_exits_nonzero():
    # docs/scaling.md's command, with no GPU to torch whatever this machine holds
    result = run_script(*doc_argv("scripts/gpu_check.sh")[1:], CUDA_VISIBLE_DEVICES="")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines() == [f"gpu_check: no GPU here (torch at {sys.executable} sees no CUDA device); "
                                          f"nothing run. --dry-run lists the checks."]


def test_the_dry_run_lists_every_check_as_one_command(dry_run):
    assert list(dry_run) == CHECKS
    assert all("train.device=cuda" in argv for name, argv in dry_run.items() if "oaif.cli" in argv)
    assert all("OAIF_TEST_DEVICE=cuda" in argv and "gpu" in argv for name, argv in dry_run.items()
               if name.startswith("pytest_"))
    assert all(argv[argv.index("--device") + 1] == "cuda" for name, argv in dry_run.items() if name.startswith("bench_"))


def oaif_runs(dry_run) -> list[tuple[str, list[str]]]:
    return [(name, argv[argv.index("oaif.cli") + 1:]) for name, argv in dry_run.items() if "oaif.cli" in argv]


def test_every_oaif_command_and_config_key_it_names_exists(dry_run):
    known = set(flatten(Config().to_dict()))
    commands = set(next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices)
    runs = oaif_runs(dry_run)
    assert {name for name, _ in runs} >= {"train_cli", "vllm_colocated", "vllm_server_disk", "vllm_collective", "fsdp"}
    for name, (command, config, *overrides) in runs:
        assert command in commands and (ROOT / config).is_file(), name
        keys = {KEY.match(o).group(1) for o in overrides}
        assert all(KEY.match(o) for o in overrides), (name, overrides)
        assert keys <= known, (name, keys - known)
        load_config(ROOT / config, overrides)  # valid values
        callables = [KEY.match(o).group(2) for o in overrides if o.startswith("annotator.callable=")]
        for target in callables:
            module, attr = target.split(":")
            assert callable(getattr(importlib.import_module(module), attr)), target


def test_every_test_file_module_and_benchmark_flag_it_names_exists(dry_run):
    for name, argv in dry_run.items():
        for module in (argv[i + 1] for i, a in enumerate(argv) if a == "-m" and argv[i + 1] not in ("gpu", "pytest")):
            if not module.startswith(("vllm.", "oaif.cli")):  # vLLM is not installed in this environment
                assert importlib.util.find_spec(module) is not None, (name, module)
        for path in (a for a in argv if a.startswith("tests/")):
            assert "@pytest.mark.gpu" in (ROOT / path).read_text(), (name, path)  # it runs something
        if name.startswith("bench_"):
            source = (ROOT / argv[1]).read_text()
            for flag in (a for a in argv[2:] if a.startswith("--")):
                assert f'add_argument("{flag}"' in source, (name, flag)
    server = dry_run["vllm_server"]
    extension = server[server.index("--worker-extension-cls") + 1]
    module, _, cls = extension.rpartition(".")
    assert isinstance(getattr(importlib.import_module(module), cls), type)
