"""Judge signal for rule-measurable properties (issue 20 part 1): before any training, how often
does the served judge prefer the reply that a rule says has the property the rubric asks for?

    python experiments/judge_signal.py --pairs 50                 # sample, pair, judge (resumable)
    python experiments/judge_signal.py --pairs 50 --screen        # stop a combination that cannot pass
    python experiments/judge_signal.py --pairs 200 --hh 300 --properties short --readouts pointwise
    python experiments/judge_signal.py --table-only               # rebuild table.md / table.json
    python experiments/judge_signal.py --smoke --out DIR          # SmolLM2 judge, tiny budgets (a test runs it)

1. Replies: the starting policy (``--policy``, default smollm2-135m-instruct) answers each prompt
   ``--num-samples`` times, sampled by ``oaif annotate PROMPTS --sample-from POLICY`` in chunks of
   ``--prompt-chunk`` prompts (``OUT/responses``; chunk k samples with ``--seed k``). Its pairs are
   labelled by ``properties:sample_order`` (a hash of the text: no preference, no ties), only so
   that every sampled reply is written. Prompts (``OUT/prompts.jsonl``, shuffled once with
   ``--seed``): Self-Instruct's user-oriented prompts of data/prompts/demo_prompts.jsonl less the
   held-out prompts of ``common.split_prompts`` for any ``n_eval <= HELD_OUT`` (its held-out sets are
   nested), then Self-Instruct's 175 seed tasks (built as scripts/build_demo_prompts.py builds
   the demo prompts). Later experiments that evaluate on split_prompts' held-out prompts never
   see these. With ``--hh N``, the first user turns of N HH harmless-base test dialogues (numbers
   2000 and up, then the ones of 1600-1999 that evidence.py does not hold out: hh_dialogues.py;
   ``OUT/prompts_hh.jsonl``) follow, from a chunk of their own, so that a property with fewer than
   ``--pairs`` pairs can reach it.
2. Properties (experiments/properties.py): one_sentence, numbered_list, no_question, short
   (at most ``--short-words`` words).
3. Pairs: per property, per prompt (in OUT/prompts.jsonl's order), one pair of that prompt's
   distinct replies of which exactly one has the property (``chosen``), drawn with
   ``random.Random(f"{seed}:{property}:{prompt id}")``; at most one pair per prompt, so the pairs
   are independent. The first ``--pairs`` of them are cut into chunk files of ``--chunk``.
4. Rubrics: ``judge_rubrics/signal_<property>.yaml`` (pairwise, oaif's openai judge, both orders)
   and ``judge_rubrics/pointwise_signal_<property>.yaml`` (experiments/pointwise_judge.py).
5. Judge: ``--judge`` served by llama.cpp on loopback; each chunk is one ``oaif annotate
   --against-labels`` (judge_table.annotate_chunks: resumable, CPU and wall seconds per chunk).
   Chunks go round-robin over property x readout, so a stopped run has screened every combination.
   With ``--screen``, a combination is not judged further once at least SCREEN_MIN pairs put the
   upper end of its 95% interval below the pass mark (more pairs could not make it pass).
6. Table: per property x readout, agreement with the rule (ties 1/2) with its Wilson 95% interval,
   both-order consistency, first-position rate, CPU and wall s/pair, failures; per property the
   base rate among replies and how many prompts have a pair. ``pass`` marks agreement >= 0.75.

Before each chunk (sampling or judging) the script waits while /work/runs/QUIET exists (``--quiet-file``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import time
from pathlib import Path

import judge_table as jt
from common import ROOT, oaif
from served_judges import JUDGES, POINTWISE, RUBRICS, served_sets

import properties

EXPERIMENTS = Path(__file__).resolve().parent
SHARED = ROOT.parent / "shared" / "data"
HELD_OUT = 80  # split_prompts(n_eval) holds out a prefix of one fixed permutation: n_eval <= 80 is excluded
READOUTS = ("pairwise", "pointwise")
PASS = 0.75


def wait_quiet(path: str) -> None:
    if path and os.path.exists(path):
        print(f"# waiting while {path} exists", flush=True)
        while os.path.exists(path):
            time.sleep(20)


# --------------------------------------------------------------------------------------------
# prompts and replies
# --------------------------------------------------------------------------------------------
def build_prompts(out: Path, seed: int, shared: Path = SHARED) -> Path:
    """OUT/prompts.jsonl (written once): the prompts the policy answers, in a fixed shuffled order."""
    path = out / "prompts.jsonl"
    if path.exists():
        return path
    from build_demo_prompts import build_self_instruct
    from common import PROMPTS

    from oaif.data.prompts import load_prompts
    from oaif.data.split import split_eval

    demo = load_prompts(PROMPTS).records
    train, _ = split_eval(demo, HELD_OUT / len(demo), 1234)  # common.split_prompts' split, n_eval = HELD_OUT
    rows = [{"id": r.id, "prompt": r.prompt} for r in train]
    rows += build_self_instruct(shared / "self_instruct_seed_tasks.jsonl", 600)
    random.Random(f"judge-signal:{seed}").shuffle(rows)
    out.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def hh_prompts(out: Path, n: int, seed: int, shared: Path = SHARED) -> Path:
    """OUT/prompts_hh.jsonl: the first user turns of ``n`` HH harmless-base test dialogues in
    hh_dialogues.signal_pool's fixed order (never evidence.py's held-out ones; a larger ``n`` extends the list)."""
    import hh_dialogues as hh

    path = out / "prompts_hh.jsonl"
    if path.exists() and len(path.read_text().splitlines()) >= n:
        return path
    pool = hh.signal_pool(seed, shared / "hh_harmless_test.jsonl.gz")
    if n > len(pool):
        raise SystemExit(f"judge_signal: --hh {n}: only {len(pool)} HH dialogues are free for it")
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in pool[:n]))
    return path


def sample_replies(out: Path, args) -> dict[str, dict]:
    """Sample every chunk of prompts not yet sampled; returns ``{prompt id: {"prompt", "replies"}}``
    over the sampled chunks (distinct replies, in sampling order)."""
    rows = [json.loads(line) for line in build_prompts(out, args.seed).read_text().splitlines() if line]
    rows = rows[:args.limit_prompts] if args.limit_prompts else rows
    hh = [json.loads(line) for line in hh_prompts(out, args.hh, args.seed).read_text().splitlines() if line] \
        if args.hh else []
    # the HH prompts start a chunk of their own, so the chunks of the first list stay as they were
    spans = [(rows, s) for s in range(0, len(rows), args.prompt_chunk)] + \
            [(hh, s) for s in range(0, len(hh), args.prompt_chunk)]
    rdir = out / "responses"
    rdir.mkdir(parents=True, exist_ok=True)
    replies: dict[str, dict] = {}
    for k, (source, start) in enumerate(spans):
        base = rdir / f"chunk_{k:05d}"
        report = base.with_suffix(".report.json")
        if not report.exists():
            wait_quiet(args.quiet_file)
            prompts = base.with_suffix(".prompts.jsonl")
            prompts.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n"
                                       for r in source[start:start + args.prompt_chunk]))
            partial = base.with_suffix(".partial.json")
            oaif("annotate", str(prompts), "--sample-from", args.policy, "--num-samples", str(args.num_samples),
                 "--max-new-tokens", str(args.max_new_tokens), "--temperature", str(args.temperature),
                 "--seed", str(k), "--batch-size", str(args.prompt_chunk), "--no-progress",
                 "--set", "type=callable", "--set", "callable=properties:sample_order",
                 "--out", str(base.with_suffix(".jsonl")), "--report", str(partial),
                 log=out / "commands.log", env={"OMP_NUM_THREADS": str(args.torch_threads)})
            partial.rename(report)
        for line in base.with_suffix(".jsonl").read_text().splitlines():
            r = json.loads(line)
            pid = r["id"].rsplit(":", 1)[0]
            entry = replies.setdefault(pid, {"prompt": r["prompt"], "replies": []})
            for text in (r["chosen"], r["rejected"]):
                if text not in entry["replies"]:
                    entry["replies"].append(text)
    return replies


# --------------------------------------------------------------------------------------------
# pairs
# --------------------------------------------------------------------------------------------
def property_pairs(replies: dict[str, dict], prop: str, holds, seed: int) -> list:
    """At most one pair per prompt: a reply with the property (chosen) against one without."""
    from oaif.data.records import PreferenceRecord

    pairs = []
    for pid, entry in replies.items():
        yes = [t for t in entry["replies"] if holds(t)]
        no = [t for t in entry["replies"] if not holds(t)]
        if yes and no:
            rng = random.Random(f"{seed}:{prop}:{pid}")
            pairs.append(PreferenceRecord(id=pid, prompt=entry["prompt"], chosen=rng.choice(yes),
                                          rejected=rng.choice(no)))
    return pairs


def write_pair_chunks(pdir: Path, pairs: list, n: int, chunk: int) -> list[Path]:
    """Chunk files of the first ``n`` pairs (a chunk file, once written, is kept as it is)."""
    from oaif.data.preferences import save_preferences

    if chunk < 2 or chunk % 2:
        raise SystemExit("judge_signal: --chunk must be even (oaif annotate alternates which slot holds the chosen reply)")
    pdir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, start in enumerate(range(0, min(n, len(pairs)), chunk)):
        path = pdir / f"chunk_{k:05d}.jsonl"
        part = pairs[start:min(start + chunk, n)]
        if len(part) < min(chunk, n - start):
            break  # a partial chunk only at the requested end: more replies may fill it later
        if not path.exists():
            save_preferences(path, part)
        paths.append(path)
    return paths


def fixed_meta(out: Path, args) -> dict:
    """The settings that the replies, pairs and rubrics depend on: written once, then checked."""
    meta = {"policy": args.policy, "num_samples": args.num_samples, "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature, "seed": args.seed, "prompt_chunk": args.prompt_chunk,
            "chunk": args.chunk, "short_words": args.short_words, "held_out": HELD_OUT}
    path = out / "meta.json"
    if path.exists():
        old = json.loads(path.read_text())
        diff = [f"{k} {old.get(k)}" for k in meta if old.get(k) != meta[k]]
        if diff:
            raise SystemExit(f"judge_signal: {out} was made with {', '.join(diff)}; use the same or another --out")
    else:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def base_rates(replies: dict[str, dict], short_words: int) -> dict:
    """Per property: the fraction of sampled replies that have it, and how many prompts have a pair."""
    texts = [t for e in replies.values() for t in e["replies"]]
    result = {}
    for prop, holds in properties.measures(short_words).items():
        result[prop] = {"base_rate": sum(map(holds, texts)) / len(texts) if texts else None,
                        "prompts_with_pair": len(property_pairs(replies, prop, holds, 0)),
                        "replies": len(texts), "prompts": len(replies)}
    words = sorted(properties.words(t) for t in texts)
    return {"properties": result, "median_words": words[len(words) // 2] if words else None}


# --------------------------------------------------------------------------------------------
# judging and the table
# --------------------------------------------------------------------------------------------
def rubric_path(prop: str, readout: str, out: Path, short_words: int) -> Path:
    """The rubric file (``short``'s bound written into a copy under OUT/rubrics)."""
    src = RUBRICS / f"{'pointwise_' if readout == 'pointwise' else ''}signal_{prop}.yaml"
    text = src.read_text()
    if "SHORTN" not in text:
        return src
    dst = out / "rubrics" / src.name
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(text.replace("SHORTN", str(short_words)))
    return dst


def judge_all(out: Path, args, chunks: dict[str, list[Path]]) -> None:
    from llama_server import start_llama_server

    combos = [(p, r) for p in chunks for r in args.readouts]
    todo = [(p, r) for p, r in combos
            if not all(jt.chunk_done(out / p / args.judge / r, k) for k in range(len(chunks[p])))]
    if not todo:
        return
    print(f"# serving {args.judge}", flush=True)
    with start_llama_server(jt.gguf_path(args.judge), n_ctx=4096, n_threads=args.threads, model_alias=args.judge,
                            startup_timeout=600, extra_args=JUDGES[args.judge]) as server:
        pid = server.process.pid
        for k in range(max(len(c) for c in chunks.values())):
            for prop, readout in todo:
                if k >= len(chunks[prop]) or jt.chunk_done(out / prop / args.judge / readout, k):
                    continue
                if screened_out(out / prop / args.judge / readout, args.screen):
                    print(f"# {prop} {readout}: screened out (95% upper bound below {PASS}); not judged further",
                          flush=True)
                    continue
                wait_quiet(args.quiet_file)
                rubric = rubric_path(prop, readout, out, args.short_words)
                if readout == "pointwise":
                    env = {"OAIF_POINTWISE_URL": server.base_url, "OAIF_POINTWISE_MODEL": args.judge,
                           "OAIF_POINTWISE_RUBRIC": str(rubric)}
                    sets = POINTWISE
                else:
                    env, sets = {}, served_sets(server.base_url, args.judge) + [f"rubric={rubric}"]
                jt.annotate_chunks(out / prop, args.judge, readout, chunks[prop][:k + 1], sets, env, pid,
                                   out, after_chunk=write_table)


SCREEN_MIN = 20  # pairs judged before a combination may be screened out


def screened_out(jdir: Path, screen: bool) -> bool:
    """With ``--screen``: whether the pairs judged so far (at least SCREEN_MIN) put the upper end of the 95%
    interval of agreement below PASS, so that judging more of them cannot make the combination pass."""
    if not screen:
        return False
    data, reports = jt.load_rows(jdir)
    return bool(data) and cannot_pass(jt.variant_stats(data, reports))


def cannot_pass(stats: dict) -> bool:
    """At least SCREEN_MIN pairs judged and the upper end of the agreement's 95% interval below PASS."""
    ci = stats["agreement_ci95"]
    return stats["judged"] >= SCREEN_MIN and ci is not None and ci[1] < PASS


def write_table(out: Path) -> dict:
    """table.json and table.md from what is on disk under OUT."""
    meta = json.loads((out / "meta.json").read_text()) if (out / "meta.json").exists() else {}
    rates = json.loads((out / "base_rates.json").read_text()) if (out / "base_rates.json").exists() else {}
    rows = []
    for prop in properties.PROPERTIES:
        judge_dirs = sorted(d for d in (out / prop).iterdir() if d.is_dir() and d.name != "pairs") \
            if (out / prop).is_dir() else []
        for judge_dir in judge_dirs:
            for readout in READOUTS:
                data, reports = jt.load_rows(judge_dir / readout)
                if data:
                    s = jt.variant_stats(data, reports)
                    rows.append({"property": prop, "judge": judge_dir.name, "readout": readout, **s,
                                 "pass": s["agreement"] is not None and s["agreement"] >= PASS,
                                 "screened_out": cannot_pass(s)})
    table = {"settings": meta, "base_rates": rates, "pass_threshold": PASS, "rows": rows}
    lines = [f"Replies: {meta.get('policy')}, {meta.get('num_samples')} per prompt, temperature "
             f"{meta.get('temperature')}, at most {meta.get('max_new_tokens')} new tokens; short = at most "
             f"{meta.get('short_words')} words.", "",
             "| property | base rate | prompts with a pair |", "| --- | --- | --- |"]
    for prop, r in rates.get("properties", {}).items():
        lines.append(f"| {prop} | {jt._f(r['base_rate'])} ({r['replies']} replies) | "
                     f"{r['prompts_with_pair']} of {r['prompts']} |")
    lines += ["", "Agreement = the judge prefers the reply that has the property (ties 1/2); "
                  f"pass = agreement >= {PASS}; screened out = after at least {SCREEN_MIN} pairs "
                  f"the interval's upper end is below {PASS}, so it was not judged further.", "",
              "| property | judge | readout | pairs | agreement [95% CI] | consistency | first-position | "
              "CPU s / pair | wall s / pair (load) | failed | pass |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['property']} | {r['judge']} | {r['readout']} | {r['judged']} | "
                     f"{jt._f(r['agreement'])} {jt._ci(r['agreement_ci95'])} | {jt._f(r['position_consistency'])} | "
                     f"{jt._f(r['first_position_rate'])} | {jt._f(r['cpu_seconds_per_pair'], 2)} | "
                     f"{jt._f(r['seconds_per_pair'], 1)} ({jt._f(r['mean_loadavg_1min'], 1)}) | "
                     f"{sum(r['failed'].values())} | {'yes' if r['pass'] else 'no (screened out)' if r['screened_out'] else 'no'} |")
    (out / "table.json").write_text(json.dumps(table, indent=2) + "\n")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    return table


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="experiments/results/judge_signal", help="output directory")
    ap.add_argument("--judge", default="qwen2.5-coder-1.5b", help=f"served judge: {', '.join(JUDGES)}")
    ap.add_argument("--properties", default=",".join(properties.PROPERTIES), help="comma-separated")
    ap.add_argument("--readouts", default=",".join(READOUTS), help="comma-separated: pairwise, pointwise")
    ap.add_argument("--pairs", type=int, default=50, help="pairs per property (a larger N judges only new chunks)")
    ap.add_argument("--chunk", type=int, default=10, help="pairs per oaif annotate command (even)")
    ap.add_argument("--policy", default="smollm2-135m-instruct", help="the starting policy that answers")
    ap.add_argument("--num-samples", type=int, default=4, help="replies per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.9)
    ap.add_argument("--prompt-chunk", type=int, default=16, help="prompts per sampling command")
    ap.add_argument("--limit-prompts", type=int, default=0, help="sample only the first N prompts (0: all)")
    ap.add_argument("--short-words", type=int, default=properties.SHORT_WORDS, help="short = at most N words")
    ap.add_argument("--seed", type=int, default=0, help="prompt order and pair draws")
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp server threads")
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="OMP_NUM_THREADS of the sampling commands (on a shared 2-core CPU, 2 threads ran 17x slower)")
    ap.add_argument("--quiet-file", default="/work/runs/QUIET", help="wait while this file exists")
    ap.add_argument("--responses-only", action="store_true", help="sample the replies and stop")
    ap.add_argument("--table-only", action="store_true", help="only rebuild table.md / table.json")
    ap.add_argument("--hh", type=int, default=0,
                    help="also sample the first user turns of N HH harmless-base dialogues (experiments/hh_dialogues.py)")
    ap.add_argument("--screen", action="store_true",
                    help=f"stop judging a property x readout once its 95%% upper bound is below {PASS} "
                         f"(after at least {SCREEN_MIN} pairs)")
    ap.add_argument("--smoke", action="store_true", help="SmolLM2 judge, 8 prompts, 2 pairs a property, every readout")
    args = ap.parse_args(argv)
    if args.smoke:
        args.judge, args.limit_prompts, args.prompt_chunk, args.max_new_tokens = "smollm2-135m", 8, 8, 32
        args.pairs, args.chunk, args.short_words = 2, 2, 15
    args.properties, args.readouts = args.properties.split(","), args.readouts.split(",")
    bad = [p for p in args.properties if p not in properties.PROPERTIES] + [r for r in args.readouts if r not in READOUTS]
    if bad or args.judge not in JUDGES or args.judge == "reward-model":
        raise SystemExit(f"judge_signal: unknown property, readout or judge: {', '.join(bad) or args.judge}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, jt._interrupt)  # `kill PID` stops the judge server and the current command too
    out = Path(args.out) if Path(args.out).is_absolute() else ROOT / args.out
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(EXPERIMENTS), os.environ.get("PYTHONPATH", "")])
    if not args.table_only:
        fixed_meta(out, args)
        replies = sample_replies(out, args)
        (out / "base_rates.json").write_text(json.dumps(base_rates(replies, args.short_words), indent=2) + "\n")
        if not args.responses_only:
            measures = properties.measures(args.short_words)
            chunks = {}
            for prop in args.properties:
                pairs = property_pairs(replies, prop, measures[prop], args.seed)
                chunks[prop] = write_pair_chunks(out / prop / "pairs", pairs, args.pairs, args.chunk)
                print(f"# {prop}: {len(pairs)} prompts have a pair; judging {sum(1 for c in chunks[prop] for _ in c.read_text().splitlines())}", flush=True)
            judge_all(out, args, chunks)
    write_table(out)
    print((out / "table.md").read_text())


if __name__ == "__main__":
    main()
