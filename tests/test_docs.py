"""README.md and docs/: the README's first screen, links that resolve, and every command in a ```bash block
claimed by exactly one test (through tests/helpers.py's doc_command, doc_commands, doc_argv, doc_oaif_args),
which runs it; the commands whose full run takes hours are parsed by their own argparse parsers here."""

from __future__ import annotations

import ast
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import CLAIM_HELPERS, doc_argv, doc_command, doc_commands, doc_files, documented_commands

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TEST_COMMAND = "scripts/setup.sh --tests && .venv/bin/python -m pytest -q"


# -- the README's first screen --------------------------------------------------------------------------
def test_the_readme_is_short_and_starts_with_the_two_commands_the_python_example_and_a_picture():
    lines = README.read_text().splitlines()
    assert len(lines) < 200
    fences = [i for i, line in enumerate(lines) if line.startswith("```")]
    first_block = lines[fences[0] + 1:fences[1]]
    assert lines[fences[0]] == "```bash" and [line.split("  #")[0].strip() for line in first_block] == \
        ["scripts/setup.sh && .venv/bin/oaif train configs/demo.yaml", TEST_COMMAND]
    python_start = lines.index("```python") + 1  # 1-based line of the example's first line
    assert python_start < 80 and lines[fences[2]] == "```python"  # the second code block
    pictures = [(i, m.group(1)) for i, line in enumerate(lines) for m in re.finditer(r"!\[[^]]*\]\(([^)]+)\)", line)]
    assert pictures and pictures[0][0] < 80
    assert (ROOT / pictures[0][1]).read_bytes()[:4] == b"\x89PNG"  # a shipped run's plot, not a new one


def test_ci_runs_the_readme_test_command_exactly():
    command = doc_command("scripts/setup.sh --tests && .venv/bin/python -m pytest -q")
    steps = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
             if line.strip() and not line.startswith("#") and not line.startswith(("set ", "cd "))]
    assert steps == [command]


# -- links ------------------------------------------------------------------------------------------------
def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"`|\*\*", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^ *```.*?^ *```", "", path.read_text(), flags=re.S | re.M)
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}


def links(path: Path) -> list[str]:
    text = re.sub(r"^ *```.*?^ *```", "", path.read_text(), flags=re.S | re.M)
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(path):
    broken = []
    for link in links(path):
        if re.match(r"[a-z]+:", link):
            continue  # http(s), mailto
        target, _, anchor = link.partition("#")
        file = (path.parent / target).resolve() if target else path
        if not file.exists():
            broken.append(f"{link}: no file {file}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{link}: no heading #{anchor} in {file.name}")
    assert not broken, "\n".join(broken)


def test_every_docs_page_is_in_both_tables_of_contents():
    pages = {p.name for p in (ROOT / "docs").glob("*.md")} - {"README.md"}
    readme_links = {Path(link.partition("#")[0]).name for link in links(README) if link.startswith("docs/")}
    index_links = {Path(link.partition("#")[0]).name for link in links(ROOT / "docs" / "README.md")}
    assert pages <= readme_links and pages <= index_links


# -- every command is claimed by exactly one test -----------------------------------------------------------
def claims() -> list[tuple[str, str, str]]:
    """(file:line, helper, literal argument) of every call of a claim helper in tests/."""
    found = []
    for path in sorted(Path(__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "id", getattr(node.func, "attr", None))
            if name not in CLAIM_HELPERS or path.name == "helpers.py":
                continue
            where = f"{path.name}:{node.lineno}"
            argument = node.args[0] if node.args else None
            assert isinstance(argument, ast.Constant) and isinstance(argument.value, str), \
                f"{where}: {name} needs the command as a literal string, so that this test can see the claim"
            found.append((where, name, argument.value))
    return found


def test_every_documented_command_is_claimed_by_exactly_one_test():
    commands = documented_commands()
    claimed: dict[str, list[str]] = {command: [] for command in commands}
    for where, helper, literal in claims():
        covered = [c for c in commands if literal in c] if helper == "doc_commands" else \
            [literal] if literal in commands else []
        assert covered, f"{where}: {helper}({literal!r}) names no command of README.md or docs/"
        for command in covered:
            claimed[command].append(where)
    unclaimed = [f"{command}  (in {', '.join(commands[command])})" for command, by in claimed.items() if not by]
    twice = [f"{command}: {', '.join(by)}" for command, by in claimed.items() if len(by) > 1]
    assert not unclaimed, "commands no test runs:\n" + "\n".join(unclaimed)
    assert not twice, "commands claimed by more than one test:\n" + "\n".join(twice)


def test_the_command_parser_joins_continued_lines_and_drops_comments():
    from helpers import bash_commands

    text = ('```bash\na --x 1 \\\n    --y 2   # a comment\nS="--p 1 \\\n   --q 2"\necho "#not a comment"\n```\n'
            '  ```bash\n  b c\n  ```\n')
    assert bash_commands(text) == ["a --x 1 --y 2", 'S="--p 1 --q 2"', 'echo "#not a comment"', "b c"]


# -- the long runs: their arguments parse ---------------------------------------------------------------------
def script_argv(command: str, variables: dict[str, str]) -> tuple[Path, list[str]]:
    """(working directory, [script, args...]) of a documented ``[cd DIR &&] [VAR=x] [nice -n N] python SCRIPT ARGS``."""
    cwd = ROOT
    if command.startswith("cd "):
        directory, command = command[3:].split(" && ", 1)
        cwd = ROOT / directory
    for name, value in variables.items():
        command = command.replace(f"${name}", value)
    argv = shlex.split(command)
    while "=" in argv[0] or argv[0] == "nice":
        argv = argv[3:] if argv[0] == "nice" else argv[1:]
    assert Path(argv[0]).name == "python", command
    return cwd, argv[1:]


def test_the_long_documented_runs_parse_with_their_scripts_parsers():
    # Full runs take hours with downloaded judges; what runs them is covered elsewhere: the experiment scripts
    # by tests/test_experiments.py (smoke runs on a tiny model), judge_table.py and fetch_judge.py by
    # tests/test_judge_scripts.py, the injection defences by tests/test_injection.py, bench_memory.py by a tiny run in
    # tests/test_benchmarks.py; bench_vs_trl.py, bench_sampling.py, bench_weight_sync.py and bench_async.py are only
    # parsed (a benchmark run needs a quiet machine and minutes; bench_async's proxy is tested in test_bench_async.py).
    assignment = doc_argv('S="--steps 12 --batch-size 4 --max-new-tokens 48 --lr 3e-4 --save-every 6 '
                          '--eval-prompts 24 --train-set model.lora.enabled=true --train-set model.lora.r=32 '
                          '--train-set model.lora.alpha=64 --train-set sampling.num_samples=2 '
                          '--train-set optim.scheduler=constant --train-set optim.warmup_steps=1"')
    name, value = assignment[0].split("=", 1)
    commands = [*doc_commands("experiments/judge_table.py"), *doc_commands("scripts/fetch_judge.py qwen2.5-coder-1.5b"),
                *doc_commands(".venv/bin/python experiments/"), *doc_commands("nice -n 15 python experiments/"),
                *doc_commands("cd experiments && python "), *doc_commands("benchmarks/bench_vs_trl.py"),
                *doc_commands("benchmarks/bench_injection.py"),
                doc_command(".venv-vllm/bin/python benchmarks/bench_sampling.py"),
                doc_command(".venv/bin/python benchmarks/bench_memory.py"),
                doc_command(".venv-vllm/bin/python benchmarks/bench_weight_sync.py --repeats 5"),
                doc_command("python benchmarks/bench_async.py --delay 0.5 --steps 5 --rounds 2 "
                            "--set annotator.both_orders=false"),
                doc_command(".venv-vllm/bin/python benchmarks/bench_async.py --backend vllm --delay 0.5 --steps 5 "
                            "--rounds 2 --set annotator.both_orders=false")]
    assert len(commands) == 33
    failed = []
    for command in commands:
        cwd, argv = script_argv(command, {name: value})
        result = subprocess.run([sys.executable, str(Path(__file__).parent / "parse_script_args.py"), str(cwd), *argv],
                                capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            failed.append(f"{command}\n  {result.stderr.strip().splitlines()[-1:]}")
        elif "--steps" in argv:  # the values reach the parsed arguments
            assert json.loads(result.stdout)["steps"] == int(argv[argv.index("--steps") + 1]), command
    assert not failed, "\n".join(failed)


def test_setup_bench_is_a_branch_of_setup_sh():
    # Building .venv-bench installs TRL from the registry (minutes); where it exists the command is run (it then
    # only checks the environment), else the script's syntax and its --bench branch are checked.
    argv = doc_argv("scripts/setup.sh --bench")
    script = (ROOT / argv[0]).read_text()
    assert subprocess.run(["bash", "-n", str(ROOT / argv[0])]).returncode == 0
    assert f'if [ "${{1:-}}" = "{argv[1]}" ]; then\n  setup_bench\n' in script
    bench = ROOT / ".venv-bench" / "bin" / "python"
    if not (bench.is_file() and subprocess.run([str(bench), "-c", "import trl, oaif"]).returncode == 0):
        pytest.skip(".venv-bench with TRL is not built here: the --bench branch was checked, not run")
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.startswith("setup done: .venv-bench (torch "), result.stderr
