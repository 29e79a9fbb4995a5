"""Shared plumbing for the experiment scripts: run oaif commands, split prompts, collect numbers.

Each experiment drives the same `oaif` commands a user would type (printed before they run), so
every number it reports can be reproduced step by step by hand. Its summary.json names the files
each number comes from: the `eval.json` of every comparison (`eval_json`) and, for every training
run, its directory, final checkpoint and `metrics.jsonl` (`run_info`).

`--judge-gguf` / `--eval-gguf` serve a judge GGUF for the experiment's whole run with the
llama.cpp server of tests/llama_server.py (names resolved by scripts/fetch_judge.py), pairwise
or pointwise (experiments/pointwise_judge.py) as `--judge-readout` / `--eval-readout` say
(`served_judges`); `--save-every N` keeps checkpoints and adds held-out length and win rate vs
the start over steps (`eval_run`, `curve`, `plot`, `curve_table`; rule_curve.py uses them too).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = ROOT / "experiments"
PROMPTS = ROOT / "data" / "prompts" / "demo_prompts.jsonl"
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


def base_parser(doc: str, out: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=out, help=f"output directory (default {out})")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="starting policy")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run")
    ap.add_argument("--batch-size", type=int, default=4, help="prompts (pairs) per step")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--lr", type=float, default=2e-6, help="peak learning rate (the demo's default: 2e-6)")
    ap.add_argument("--eval-prompts", type=int, default=40, help="held-out prompts for the win rates")
    ap.add_argument("--smoke", action="store_true", help="one step, tiny budgets: checks that everything runs")
    ap.add_argument("--judge-set", action="append", default=[], metavar="KEY=VALUE",
                    help="annotator override for the training judge (repeatable)")
    ap.add_argument("--eval-set", action="append", default=[], metavar="KEY=VALUE",
                    help="annotator override for the evaluation judge (repeatable)")
    ap.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE",
                    help="any other training override, applied last, e.g. --train-set model.lora.enabled=true "
                         "--train-set sampling.num_samples=4 (repeatable)")
    ap.add_argument("--save-every", type=int, default=0,
                    help="checkpoint every N steps and report held-out win rate and length over steps "
                         "(`oaif eval --run`); 0: final checkpoint only")
    ap.add_argument("--judge-gguf", metavar="NAME_OR_PATH",
                    help="serve this GGUF (a scripts/fetch_judge.py name or a file) with llama.cpp on loopback "
                         "as the training judge")
    ap.add_argument("--eval-gguf", metavar="NAME_OR_PATH", help="the same for the evaluation judge")
    ap.add_argument("--judge-readout", choices=("pairwise", "pointwise"), default="pairwise",
                    help="served training judge: pairwise labels (oaif's openai judge) or a yes/no score per "
                         "reply (experiments/pointwise_judge.py)")
    ap.add_argument("--eval-readout", choices=("pairwise", "pointwise"), default="pairwise",
                    help="the same for the served evaluation judge")
    ap.add_argument("--server-threads", type=int, default=2, help="threads of each llama.cpp server")
    return ap


def parse_args(ap: argparse.ArgumentParser, default_steps: int) -> tuple[argparse.Namespace, Path, Path]:
    """Parse the command line and fill in the smoke-mode budgets; returns ``(args, out, log)``:
    the output directory (resolved against the repository root, created) and its commands.log."""
    args = ap.parse_args()
    if not Path(args.out).is_absolute():
        args.out = str(ROOT / args.out)
    if args.smoke:
        args.steps, args.batch_size, args.max_new_tokens, args.eval_prompts = 1, 2, 8, 2
    elif args.steps is None:
        args.steps = default_steps
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return args, out, out / "commands.log"


def oaif(*argv: str, log: Path | None = None, env: dict[str, str] | None = None) -> float:
    """Run an oaif command (``env``: extra environment), echoing it; returns its wall time.
    A failure stops the experiment."""
    cmd = [sys.executable, "-m", "oaif.cli", *argv]
    print("$ " + "".join(f"{k}={shlex.quote(v)} " for k, v in (env or {}).items())
          + "oaif " + " ".join(shlex.quote(a) for a in argv), flush=True)
    t0 = time.perf_counter()
    with open(log, "a") if log else open("/dev/null", "w") as f:
        result = subprocess.run(cmd, cwd=ROOT, stdout=f if log else None, stderr=subprocess.STDOUT if log else None,
                                env={**os.environ, **env} if env else None)
    if result.returncode != 0:
        raise SystemExit(f"command failed ({result.returncode}): oaif {' '.join(argv)}" + (f"; see {log}" if log else ""))
    return time.perf_counter() - t0


def split_prompts(out: Path, n_eval: int, seed: int = 1234) -> tuple[Path, Path]:
    """Write a fixed train / held-out split of the shipped demo prompts into ``out``."""
    from oaif.data import load_prompts, split_eval

    records = load_prompts(PROMPTS).records
    train, held = split_eval(records, max(n_eval, 1) / len(records), seed)
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "train_prompts.jsonl", out / "heldout_prompts.jsonl"
    for path, rows in zip(paths, (train, held[:n_eval])):
        path.write_text("".join(json.dumps({"id": r.id, "prompt": r.prompt}) + "\n" for r in rows))
    return paths


def train_overrides(args, out_dir: Path, train_prompts: Path, *extra: str) -> list[str]:
    return [str(ROOT / "configs" / "demo.yaml"), f"model.name_or_path={args.model}", f"data.path={train_prompts}",
            "data.eval_fraction=0", f"train.max_steps={args.steps}", f"train.batch_size={args.batch_size}",
            f"sampling.max_new_tokens={args.max_new_tokens}", f"train.output_dir={out_dir}",
            f"train.save_every={args.save_every}", "train.keep_last=1000",
            f"optim.lr={args.lr}",
            *[f"annotator.{s}" for s in args.judge_set], *extra, *args.train_set]


def final_checkpoint(run_dir: Path) -> Path:
    return run_dir / (run_dir / "latest").read_text().strip()


def run_info(run_dir: Path) -> dict:
    """Where a finished training run keeps what the summary reports about it."""
    return {"dir": str(run_dir), "checkpoint": str(final_checkpoint(run_dir)), "metrics": str(run_dir / "metrics.jsonl")}


def eval_pair(args, a: str, b: str, heldout: Path, out_dir: Path, log: Path) -> dict:
    """`oaif eval A B` on the held-out prompts; returns the headline of its eval.json."""
    oaif("eval", str(a), str(b), "--prompts", str(heldout), "--limit", str(args.eval_prompts), "--out", str(out_dir),
         "--max-new-tokens", str(args.max_new_tokens), "--no-progress",
         *[x for s in args.eval_set for x in ("--set", s)], log=log)
    return headline(out_dir / "eval.json")


def headline(eval_json: Path) -> dict:
    """Win rate with its CI, and both models' mean response length, from an eval.json (named in it)."""
    result = json.loads(eval_json.read_text())
    c = result["comparisons"][0]
    models = result["models"]
    return {"win_rate": c["win_rate"], "ci": c["ci95"], "n": c["judged"], "failed": c["failed_total"],
            "ties": c["ties"], "consistency": c.get("judge_consistency"),
            "len_a": models[c["a"]]["tokens"]["mean"], "len_b": models[c["b"]]["tokens"]["mean"],
            "judge": result["judge"]["name"], "eval_json": str(eval_json)}


def fmt(h: dict) -> str:
    ci = h.get("ci") or [float("nan"), float("nan")]
    return f"{h['win_rate']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] (n={h['n']})"


def write_summary(out: Path, name: str, rows: list[dict], lines: list[str]) -> None:
    (out / "summary.json").write_text(json.dumps({"experiment": name, "rows": rows}, indent=2))
    (out / "summary.md").write_text(f"# {name}\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


# --------------------------------------------------------------------------------------------
# served judges: --judge-gguf / --eval-gguf
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# curves over steps: `oaif eval --run` on a run's checkpoints
# --------------------------------------------------------------------------------------------
def curve(eval_json: Path, metrics_jsonl: Path) -> dict:
    """Per evaluated step: held-out mean tokens with a bootstrap CI over prompts, and the win rate vs
    the start (from eval.json); the training samples' mean response length per step (metrics.jsonl)."""
    from oaif.stats import bootstrap_ci

    result = json.loads(eval_json.read_text())
    boot = result["bootstrap"]
    samples = result["samples"]
    labels = sorted(result["models"], key=lambda m: result["models"][m]["step"])
    comps = {c["b" if c["a"] == "start" else "a"]: c for c in result["comparisons"]}
    rows = []
    for label in labels:
        tokens = [s["tokens"][label] for s in samples]
        ci = bootstrap_ci(tokens, boot["resamples"], boot["seed"])
        row = {"step": result["models"][label]["step"], "model": result["models"][label]["model"],
               "tokens_mean": sum(tokens) / len(tokens), "tokens_ci95": list(ci), "n_prompts": len(tokens)}
        c = comps.get(label)
        if c is not None:
            row.update(win_rate=c["win_rate"], win_ci95=c["ci95"], wins=c["wins"], ties=c["ties"],
                       losses=c["losses"], judged=c["judged"], failed=c["failed_total"])
        rows.append(row)
    records = [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line.strip()]
    train = [[r["step"], r["response_length"]] for r in records if isinstance(r.get("response_length"), (int, float))]
    return {"rows": rows, "train_response_length": train, "judge": result["judge"]["name"],
            "training_judge": result["judge"].get("training_judge")}


def plot(c: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = c["rows"]
    steps = [r["step"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot(steps, [r["tokens_mean"] for r in rows], "o-", color="C0", label="held-out, mean tokens (95% CI)")
    ax1.fill_between(steps, [r["tokens_ci95"][0] for r in rows], [r["tokens_ci95"][1] for r in rows],
                     color="C0", alpha=0.2)
    if c["train_response_length"]:
        ts, tl = zip(*c["train_response_length"])
        ax1.plot(ts, tl, "-", color="C1", alpha=0.7, lw=1, label="training samples, mean tokens")
    ax1.set_xlabel("step")
    ax1.set_ylabel("response tokens")
    ax1.legend(fontsize=8)
    ax1.set_title("response length")
    wr = [r for r in rows if "win_rate" in r]
    ax2.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax2.plot([r["step"] for r in wr], [r["win_rate"] for r in wr], "o-", color="C2")
    ax2.fill_between([r["step"] for r in wr], [r["win_ci95"][0] for r in wr], [r["win_ci95"][1] for r in wr],
                     color="C2", alpha=0.2)
    ax2.set_ylim(0, 1)
    ax2.set_xlabel("step")
    ax2.set_ylabel("win rate vs start")
    ax2.set_title(f"win rate vs start ({c['judge']})", fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def eval_run(args, run_dir: Path, heldout: Path, log: Path, judge_sets: list[str], title: str) -> dict:
    """`oaif eval --run` every checkpoint of ``run_dir`` (and the start) on the held-out prompts,
    each judged against the start; returns :func:`curve` with the plot (``run_dir/curve.png``)
    and the eval.json it was read from."""
    oaif("eval", "--run", str(run_dir), "--prompts", str(heldout), "--limit", str(args.eval_prompts),
         "--out", str(run_dir / "eval"), "--max-new-tokens", str(args.max_new_tokens), "--no-progress",
         *[x for s in judge_sets for x in ("--set", s)], log=log)
    c = curve(run_dir / "eval" / "eval.json", run_dir / "metrics.jsonl")
    png = run_dir / "curve.png"
    plot(c, png, title)
    return {**c, "eval_json": str(run_dir / "eval" / "eval.json"), "plot": str(png)}


def curve_table(c: dict) -> list[str]:
    """Markdown table of a :func:`curve`: per step, held-out mean tokens and win rate vs the start."""
    lines = ["| step | held-out mean tokens [95% CI] | win rate vs start [95% CI] | W / T / L |",
             "| --- | --- | --- | --- |"]
    for r in c["rows"]:
        wr = (f"{r['win_rate']:.3f} [{r['win_ci95'][0]:.3f}, {r['win_ci95'][1]:.3f}]" if "win_rate" in r else "-")
        wtl = f"{r['wins']} / {r['ties']} / {r['losses']}" if "win_rate" in r else "-"
        lines.append(f"| {r['step']} | {r['tokens_mean']:.1f} [{r['tokens_ci95'][0]:.1f}, {r['tokens_ci95'][1]:.1f}] "
                     f"| {wr} | {wtl} |")
    return lines
