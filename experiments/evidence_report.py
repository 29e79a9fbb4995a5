"""summary.md, summary.json and evidence.png of experiments/evidence.py, recomputed from the files on disk.

Per run and evaluated step (OUT/<run>/eval/eval.json: one reply per held-out prompt from the start and
every checkpoint, the same seed): the property's rate by its rule with a Wilson 95% interval, the mean
response tokens, and against the start the paired difference in rate with a bootstrap 95% interval over
prompts. Between two runs (claim 1: property - helpful; claim 2: online - offline) the paired
difference at each step they share, the same way (same prompts, same sampling seed). Claim 2 adds the
head-to-head win rate of OUT/online_vs_offline/eval.json (the judge's other readout). Claim 3
(OUT/claim3/, experiments/evidence_rm.py): each reward model's agreement with held-out human labels,
each run's win rate against the start by the training reward model over steps, and the comparisons
of final replies by the held-out reward model and the LLM judge, and how far the two reward models
agree with each other on the same pairs (each run's final reply against its start).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import properties

RUNS = ("property", "helpful", "offline")
PAIRS = (("claim 1: property rubric - helpful rubric", "property", "helpful"),
         ("claim 2: online - offline", "property", "offline"))


def run_rows(eval_json: Path, prop: str) -> dict:
    """``{"steps": [...], "holds": {label: [0/1 per prompt]}, "tokens": {label: [...]}, "labels": {step: label}}``."""
    result = json.loads(eval_json.read_text())
    holds_fn = properties.measures(properties.SHORT_WORDS)[prop]
    labels = sorted(result["models"], key=lambda m: result["models"][m]["step"])
    samples = result["samples"]
    return {"labels": {result["models"][m]["step"]: m for m in labels},
            "holds": {m: [1.0 if holds_fn(s["responses"][m]) else 0.0 for s in samples] for m in labels},
            "tokens": {m: [float(s["tokens"][m]) for s in samples] for m in labels},
            "ids": [s["id"] for s in samples]}


def _diff(a: list[float], b: list[float]) -> dict:
    from oaif.stats import bootstrap_ci

    d = [x - y for x, y in zip(a, b)]
    ci = bootstrap_ci(d, 2000, 0)
    return {"diff": sum(d) / len(d), "ci95": list(ci) if ci else None, "n": len(d)}


def step_stats(r: dict, step: int) -> dict:
    from oaif.stats import wilson_interval

    label, start = r["labels"][step], r["labels"][0]
    h, t = r["holds"][label], r["tokens"][label]
    ci = wilson_interval(sum(h), len(h))
    return {"step": step, "rate": sum(h) / len(h), "rate_ci95": list(ci) if ci else None, "n": len(h),
            "tokens": sum(t) / len(t), "rate_vs_start": _diff(h, r["holds"][start]),
            "tokens_vs_start": _diff(t, r["tokens"][start])}


def collect(out: Path, prop: str) -> dict:
    runs = {name: run_rows(out / name / "eval" / "eval.json", prop)
            for name in RUNS if (out / name / "eval" / "eval.json").exists()}
    table: dict = {"property": prop, "runs": {}, "differences": [], "head_to_head": None}
    for name, r in runs.items():
        table["runs"][name] = [step_stats(r, s) for s in sorted(r["labels"])]
    for title, a, b in PAIRS:
        if a in runs and b in runs and runs[a]["ids"] == runs[b]["ids"]:
            ra, rb = runs[a], runs[b]
            table["differences"].append({"comparison": title, "steps": [
                {"step": s, "rate": _diff(ra["holds"][ra["labels"][s]], rb["holds"][rb["labels"][s]]),
                 "tokens": _diff(ra["tokens"][ra["labels"][s]], rb["tokens"][rb["labels"][s]])}
                for s in sorted(set(ra["labels"]) & set(rb["labels"])) if s > 0]})
    table["head_to_head"] = head_to_head(out / "online_vs_offline")
    table["claim3"] = claim3(out / "claim3")
    prefs = out / "offline_data" / "prefs.jsonl"
    if prefs.exists():  # ties and failures are left out of the file: fewer than 384 pairs repeat some in training
        table["offline_pairs"] = {"labelled": sum(1 for x in prefs.read_text().splitlines() if x.strip()),
                                  "asked": sum(1 for x in (out / "offline_data" / "pairs.jsonl").read_text().splitlines()
                                               if x.strip())}
    return table


def head_to_head(d: Path) -> dict | None:
    """Win rate of the online reply (ties 1/2; identical replies are ties) with a bootstrap 95% interval."""
    from oaif.stats import bootstrap_ci

    if not (d / "report.json").exists():
        return None
    rows = [json.loads(x) for x in (d / "judgments.jsonl").read_text().splitlines() if x.strip()]
    identical = json.loads((d / "identical.json").read_text())
    scores = [r["agree"] for r in rows if r.get("failure") is None and "agree" in r] + [0.5] * len(identical["ids"])
    ci = bootstrap_ci(scores, 2000, 0)
    return {"win_rate": sum(scores) / len(scores) if scores else None, "ci95": list(ci) if ci else None,
            "judged": len(scores), "identical": len(identical["ids"]), "failed": len(rows) + len(identical["ids"]) - len(scores),
            "ties": sum(s == 0.5 for s in scores), "judge": rows[0]["judge"] if rows else None,
            "a": identical["a"], "b": identical["b"]}


def claim3(d: Path) -> dict | None:
    """Claim 3's numbers from OUT/claim3 (None before its first piece)."""
    if not d.exists():
        return None
    from evidence_rm import BY_HELDOUT_RM, BY_LLM, RUNS

    t: dict = {"reward_models": {}, "runs": {}, "comparisons": {}}
    for name in ("train", "heldout"):
        f = d / "reward_models" / f"{name}.json"
        if f.exists():
            rm = json.loads(f.read_text())
            t["reward_models"][name] = {**rm["agreement"], "hh_range": rm["trained"].get("hh_range"),
                                        "trained_pairs": rm["trained"].get("trained_pairs")}
    for run in RUNS:
        f = d / run / "eval" / "eval.json"
        if f.exists():
            result = json.loads(f.read_text())
            t["runs"][run] = {"judge": result["judge"]["name"], "start_tokens": min(
                result["models"].values(), key=lambda m: m["step"])["tokens"]["mean"], "steps": [
                {"step": c["step"], "win_rate": c["win_rate"], "ci95": c["ci95"],
                 "tokens": result["models"][c["a"]]["tokens"]["mean"]} for c in result["comparisons"]]}
    for name in (*BY_HELDOUT_RM, BY_LLM):
        h = head_to_head(d / name)
        if h:
            t["comparisons"][name] = h
    t["reward_models_agree"] = {run: a for run in RUNS if (a := rm_cross_check(d, run)) is not None}
    return t


def rm_cross_check(d: Path, run: str) -> dict | None:
    """How far the two reward models agree on the same pairs: run ``run``'s final reply against its
    start reply on each held-out prompt, judged by the ``train`` reward model (its `oaif eval --run`)
    and by the ``heldout`` one (OUT/claim3/<run>_vs_start_by_heldout_rm). The fraction of prompts
    where both prefer the same reply, and the Pearson correlation of their reward differences
    (the logits of their P(final better)); identical replies are left out."""
    held = d / f"{run}_vs_start_by_heldout_rm" / "judgments.jsonl"
    result = d / run / "eval" / "eval.json"
    if not (held.exists() and result.exists()):
        return None
    e = json.loads(result.read_text())
    final = max(e["comparisons"], key=lambda c: c["step"])["a"]
    train = {s["id"]: j["prob_a"] for s in e["samples"] for j in s["judgments"]
             if j["a"] == final and j["b"] == "start" and not j["identical"] and j["failure"] is None}
    rows = [json.loads(x) for x in held.read_text().splitlines() if x.strip()]
    both = [(train[r["id"]], r["p_chosen"]) for r in rows if r.get("failure") is None and r["id"] in train]
    try:  # fewer than two pairs, or one judge's differences all equal: no correlation
        r = statistics.correlation([_logit(a) for a, _ in both], [_logit(b) for _, b in both])
    except statistics.StatisticsError:
        r = None
    same = sum((a > 0.5) == (b > 0.5) for a, b in both) / len(both) if both else None
    return {"pairs": len(both), "same_preference": same, "pearson_r": r, "step": final}


def _logit(p: float) -> float:
    """The reward difference behind P(better) = sigmoid(difference); a saturated 0 or 1 is clipped."""
    p = min(max(p, 1e-12), 1 - 1e-12)
    return math.log(p / (1 - p))


def claim3_markdown(t: dict) -> list[str]:
    lines = ["## claim 3: reward-model against LLM feedback on HH prompts", ""]
    for name, r in t["reward_models"].items():
        lo, hi = r["hh_range"]
        lines.append(f"- reward model `{name}` (HH pairs {lo}-{hi - 1}, {r['trained_pairs']} trained on): agreement "
                     f"with held-out human labels {r['agreement']:.3f} {_ci(r['agreement_ci95'])} on {r['judged']} pairs")
    if t["reward_models"]:
        lines.append("")
    for run, r in t["runs"].items():
        lines += [f"run `{run}` against the start by {r['judge']} (start {r['start_tokens']:.1f} tokens):", "",
                  "| step | win rate [95% CI] | mean tokens |", "| --- | --- | --- |"]
        lines += [f"| {s['step']} | {s['win_rate']:.3f} {_ci(s['ci95'])} | {s['tokens']:.1f} |" for s in r["steps"]]
        lines.append("")
    for name, h in t["comparisons"].items():
        lines.append(f"- `{name}`: {h['a']} against {h['b']}: win rate {h['win_rate']:.3f} {_ci(h['ci95'])} over "
                     f"{h['judged']} prompts ({h['ties']} ties, {h['identical']} identical; {h['failed']} failed); "
                     f"judge {h['judge']}")
    for run, a in t.get("reward_models_agree", {}).items():
        lines.append(f"- the two reward models on run `{run}`'s {a['step']} reply against its start ({a['pairs']} prompts): "
                     f"same preference {_num(a['same_preference'])}, Pearson r of their reward differences "
                     f"{_num(a['pearson_r'])}")
    return lines + [""]


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _ci(ci, digits: int = 3) -> str:
    return f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "[-]"


def markdown(t: dict) -> str:
    prop = t["property"]
    lines = [f"# Issue 20 part 3: property `{prop}`", ""]
    for name, rows in t["runs"].items():
        lines += [f"## run `{name}`: held-out `{prop}` rate by the rule, over steps", "",
                  "| step | rate [95% CI] | rate - start [95% CI] | mean tokens | tokens - start [95% CI] | prompts |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for r in rows:
            dr, dt = r["rate_vs_start"], r["tokens_vs_start"]
            lines.append(f"| {r['step']} | {r['rate']:.3f} {_ci(r['rate_ci95'])} | {dr['diff']:+.3f} {_ci(dr['ci95'])} | "
                         f"{r['tokens']:.1f} | {dt['diff']:+.1f} {_ci(dt['ci95'], 1)} | {r['n']} |")
        lines.append("")
    for d in t["differences"]:
        lines += [f"## {d['comparison']} (paired over held-out prompts)", "",
                  "| step | rate difference [95% CI] | tokens difference [95% CI] |", "| --- | --- | --- |"]
        lines += [f"| {s['step']} | {s['rate']['diff']:+.3f} {_ci(s['rate']['ci95'])} | "
                  f"{s['tokens']['diff']:+.1f} {_ci(s['tokens']['ci95'], 1)} |" for s in d["steps"]]
        lines.append("")
    if t.get("offline_pairs"):
        o = t["offline_pairs"]
        lines += [f"offline data: {o['labelled']} of {o['asked']} pairs of distinct replies labelled (ties and "
                  "failed judgments left out); the offline run draws 24 a step for 16 steps, so a shortfall "
                  "repeats some of them", ""]
    h = t["head_to_head"]
    if h:
        lines += ["## claim 2: final online against final offline, by the judge's other readout", "",
                  f"win rate of online ({h['a']}) against offline ({h['b']}) {h['win_rate']:.3f} {_ci(h['ci95'])} over "
                  f"{h['judged']} prompts ({h['ties']} ties, of which {h['identical']} identical replies; {h['failed']} "
                  f"failed, left out); judge: {h['judge']}", ""]
    if t.get("claim3") and any(t["claim3"].values()):  # nothing before its first measured piece
        lines += claim3_markdown(t["claim3"])
    return "\n".join(lines)


def plot(t: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, (name, rows) in enumerate(t["runs"].items()):
        steps = [r["step"] for r in rows]
        ax1.plot(steps, [r["rate"] for r in rows], "o-", color=f"C{i}", label=name)
        ax1.fill_between(steps, [r["rate_ci95"][0] for r in rows], [r["rate_ci95"][1] for r in rows],
                         color=f"C{i}", alpha=0.15)
        ax2.plot(steps, [r["tokens"] for r in rows], "o-", color=f"C{i}", label=name)
    ax1.set(xlabel="step", ylabel=f"held-out {t['property']} rate (rule)", ylim=(0, 1))
    ax2.set(xlabel="step", ylabel="held-out mean tokens")
    ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_summary(args) -> str:
    t = collect(args.out, args.property)
    (args.out / "summary.json").write_text(json.dumps(t, indent=2) + "\n")
    text = markdown(t)
    if t["runs"]:
        plot(t, args.out / "evidence.png")
        text += "\nplot: evidence.png\n"
    (args.out / "summary.md").write_text(text)
    return text
