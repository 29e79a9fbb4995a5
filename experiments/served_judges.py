"""Judges served for an experiment's whole run: `--judge-gguf` / `--eval-gguf` start the llama.cpp
server of tests/llama_server.py for a judge GGUF (names resolved by scripts/fetch_judge.py), read
pairwise (oaif's OpenAI-compatible judge) or pointwise (experiments/pointwise_judge.py) as
`--judge-readout` / `--eval-readout` say, and stop it on exit, error or SIGTERM."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from pathlib import Path

from common import EXPERIMENTS, ROOT

RUBRICS = EXPERIMENTS / "judge_rubrics"
POINTWISE = ["type=callable", "callable=pointwise_judge:score"]  # experiments/pointwise_judge.py
# judge name -> llama.cpp server arguments beyond the model (Gemma's GGUF carries no chat template)
JUDGES: dict[str, list[str]] = {
    "smollm2-135m": [],
    "gemma-3-270m": ["--chat_format", "gemma"],
    "qwen2.5-coder-0.5b": [],
    "qwen2.5-coder-1.5b": [],
    "reward-model": [],  # trained by judge_table.py --train-rm, not served
}


def fail(message: str) -> None:
    """Stop with a one-line error (exit status 2)."""
    print(f"experiments: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def _import_helpers() -> None:
    """scripts/fetch_judge.py (names, cache) and tests/llama_server.py (the server) are importable."""
    for d in (ROOT / "scripts", ROOT / "tests"):
        if str(d) not in sys.path:
            sys.path.append(str(d))


def resolve_gguf(spec: str, option: str = "--judge-gguf") -> tuple[str, Path]:
    """``(name, file)`` of a judge GGUF: a name known to scripts/fetch_judge.py is the file it
    fetched into its cache (missing: a one-line error saying how to fetch it); anything else is a path."""
    _import_helpers()
    from fetch_judge import DEFAULT_CACHE, SOURCES

    if spec in SOURCES:
        path = DEFAULT_CACHE / f"{spec}.gguf"
        if not path.is_file():
            fail(f"{option} {spec}: {path} is missing; "
                             f"run `python scripts/fetch_judge.py {spec}`")
        return spec, path
    path = Path(spec).expanduser()
    if not path.is_file():
        fail(f"{option} {spec}: no such file, and not a judge name of "
                         f"scripts/fetch_judge.py ({', '.join(SOURCES)})")
    return path.name.removesuffix(".gguf"), path.resolve()


def pointwise_env(rubric: str) -> dict[str, str]:
    """The environment that points experiments/pointwise_judge.py at the pointwise form of ``rubric``."""
    path = RUBRICS / f"pointwise_{rubric}.yaml"
    if not path.is_file():
        fail(f"the pointwise readout has no rubric {path.name} in {RUBRICS}")
    return {"OAIF_POINTWISE_RUBRIC": str(path)}


@contextlib.contextmanager
def _sigterm_exits():
    """SIGTERM ends the script through SystemExit, so every ``finally`` (the servers' stop) runs."""
    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def served_judges(args, rubric: str = "helpful"):
    """Serve ``--judge-gguf`` / ``--eval-gguf`` (one server when both name the same file) with
    llama.cpp on loopback for the whole experiment, and point the training judge
    (``args.judge_set``) and the evaluation judge (``args.eval_set``) at them; the user's own
    ``--judge-set`` / ``--eval-set`` still apply after. The pointwise readout reads its server and
    rubric (``judge_rubrics/pointwise_<rubric>.yaml``) from the environment. Sets
    ``args.train_judge`` / ``args.eval_judge`` (what the summary says judged) and stops every server
    on exit, on error and on SIGTERM."""
    args.train_judge = f"configs/demo.yaml annotator{' + ' + ', '.join(args.judge_set) if args.judge_set else ''}"
    args.eval_judge = ", ".join(args.eval_set) if args.eval_set else "oaif eval's default judge (embedded SmolLM2)"
    wanted = [(role, spec, readout) for role, spec, readout in
              (("train", args.judge_gguf, args.judge_readout), ("eval", args.eval_gguf, args.eval_readout)) if spec]
    resolved = {role: resolve_gguf(spec, f"--{'judge' if role == 'train' else 'eval'}-gguf")
                for role, spec, _ in wanted}
    for role, readout, spec in (("judge", args.judge_readout, args.judge_gguf),
                                ("eval", args.eval_readout, args.eval_gguf)):
        if readout == "pointwise" and not spec:
            fail(f"--{role}-readout pointwise needs the judge it reads: --{role}-gguf NAME_OR_PATH")
    if sum(readout == "pointwise" for *_, readout in wanted) == 2 and resolved["train"][1] != resolved["eval"][1]:
        fail("the pointwise readout serves one model per experiment; "
             "use it for the training or the evaluation judge, or the same GGUF for both")
    rubric_env = pointwise_env(rubric) if any(readout == "pointwise" for *_, readout in wanted) else {}
    _import_helpers()
    from llama_server import start_llama_server

    saved_env = {k: os.environ.get(k) for k in ("OAIF_POINTWISE_URL", "OAIF_POINTWISE_MODEL", "OAIF_POINTWISE_RUBRIC",
                                                "PYTHONPATH")}
    with _sigterm_exits(), contextlib.ExitStack() as stack:
        stack.callback(_restore_env, saved_env)
        servers = {}
        for role, _, readout in wanted:
            name, path = resolved[role]
            if path not in servers:
                print(f"# serving {name} ({path}) with llama.cpp on loopback", flush=True)
                servers[path] = stack.enter_context(start_llama_server(
                    str(path), n_ctx=4096, n_threads=args.server_threads, model_alias=name, startup_timeout=600,
                    extra_args=JUDGES.get(name, [])))
                print(f"# llama.cpp server for {name}: pid {servers[path].process.pid}, {servers[path].base_url}",
                      flush=True)
            server = servers[path]
            if readout == "pointwise":
                os.environ.update({"OAIF_POINTWISE_URL": server.base_url, "OAIF_POINTWISE_MODEL": name,
                                   **rubric_env,
                                   "PYTHONPATH": os.pathsep.join(x for x in (str(EXPERIMENTS),
                                                                             os.environ.get("PYTHONPATH")) if x)})
                sets = list(POINTWISE)
            else:
                sets = served_sets(server.base_url, name)
            desc = f"{name} ({path}), {readout} readout, served by llama.cpp at {server.base_url}"
            if role == "train":
                args.judge_set = sets + args.judge_set
                args.train_judge = desc
            else:
                args.eval_set = sets + args.eval_set
                args.eval_judge = desc
        args.servers = list(servers.values())
        yield args


def served_sets(base_url: str, model: str) -> list[str]:
    """Annotator keys of oaif's OpenAI-compatible judge for a llama.cpp server on loopback."""
    return ["type=openai", f"base_url={base_url}", f"model={model}", "concurrency=2", "request_timeout=1800",
            "max_retries=0"]


def _restore_env(saved: dict[str, str | None]) -> None:
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def judge_lines(args) -> list[str]:
    """Which judge trained and which evaluated (summary.md states both)."""
    if args.judge_gguf and args.eval_gguf:
        same_model = resolve_gguf(args.judge_gguf)[1] == resolve_gguf(args.eval_gguf)[1]
        note = (" (the same judge as in training)" if same_model and args.judge_readout == args.eval_readout else
                " (not the training judge: the same model, the other readout)" if same_model else
                " (not the training judge: another model)")
    else:
        note = ""
    return [f"training judge: {args.train_judge}", f"evaluation judge: {args.eval_judge}{note}"]
