"""The evaluation report: ``report.md`` (Markdown) from :mod:`oaif.evaluation.evaluate`'s result, with
the plots of :mod:`oaif.evaluation.plots`.

Number formats and file writes come from :mod:`oaif.evaluation.formats`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from oaif.evaluation.formats import fmt, fmt_ci, fmt_counts, write_text
from oaif.evaluation.plots import make_plots


def _fence(text: str, limit: int = 600) -> str:
    """``text`` (cut at ``limit`` characters) in a code fence longer than any backtick run inside."""
    body = text if len(text) <= limit else text[:limit] + f" [... {len(text) - limit} more characters]"
    longest = max((len(run) for run in body.split("\n") for run in _backtick_runs(run)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{body if body else '(empty response)'}\n{fence}"


def _backtick_runs(line: str) -> list[str]:
    runs, cur = [], ""
    for ch in line:
        if ch == "`":
            cur += ch
        elif cur:
            runs.append(cur)
            cur = ""
    if cur:
        runs.append(cur)
    return runs


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n\n".join(f"{m.get('role', '?').capitalize()}: {m.get('content', '')}" for m in prompt)


# --------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------
def _header(result: dict) -> list[str]:
    j, p, g, b = result["judge"], result["prompts"], result["generation"], result["bootstrap"]
    if result["mode"] == "run":
        title = f"# Evaluation of run `{result['run']}`"
        what = (f"Each checkpoint against the run's starting model `{result['start_model']}` "
                f"(win rate of the checkpoint; 0.5 = no better than the start).")
    else:
        a, bb = list(result["models"])
        title = f"# Evaluation: {a} vs {bb}"
        what = (f"Model {a} = `{result['models'][a]['model']}` against model {bb} = "
                f"`{result['models'][bb]['model']}` (win rate of {a}).")
    source = p.get("kind", "prompts")
    if p.get("path"):
        source += f" `{p['path']}`"
    if p.get("kind") == "run eval split":
        source += f" (eval_fraction {p['eval_fraction']}, seed {p['seed']}, of {p['split_of']} usable prompts)"
    lines = [title, "", what, "",
             f"- **Judge:** `{j['name']}` ({j['description']})"]
    if "training_judge" in j:
        same = "the same judge" if j.get("same_as_training") else "a different judge"
        lines.append(f"- **Training judge:** {j['training_judge']} ({same})")
    lines += [
        f"- **Prompts:** {p['count']} from {source}"
        + (f", first {p['limit']}" if p.get("limit") else "")
        + (f"; skipped: {fmt_counts(p['skipped'])}" if p.get("skipped") else ""),
        f"- **Generation:** one response per prompt and model, temperature {g['temperature']}, top-p {g['top_p']}, "
        f"at most {g['max_new_tokens']} new tokens, seed {g['seed']} (the same for every model), "
        f"chat template {'on' if g['chat_template'] else 'off'}"
        + (f", system prompt {g['system_prompt']!r}" if g.get("system_prompt") else ""),
        "- **Win rate:** per prompt, the judge's P(A better) p scores 1 if p > 0.5, 1/2 if p = 0.5, 0 otherwise; "
        "identical responses are ties without asking the judge; failed judgments are left out and counted. "
        "A's response is shown first on even prompts and second on odd ones.",
        f"- **95% CI:** {b['method']}, {b['resamples']} resamples, seed {b['seed']}.",
        "",
    ]
    return lines


def _comparison_table(result: dict) -> list[str]:
    run = result["mode"] == "run"
    head = "| step | checkpoint | " if run else "| A | B | "
    lines = [head + "win rate | 95% CI | mean P(better) | 95% CI | wins / ties / losses | identical | failed | "
                    "judge consistency |",
             "|" + "---|" * 10]
    for c in result["comparisons"]:
        first = f"| {c['step']} | {c['a']} | " if run else f"| {c['a']} | {c['b']} | "
        lines.append(first + f"{fmt(c['win_rate'])} | {fmt_ci(c['ci95'])} | {fmt(c['mean_prob'])} | "
                     f"{fmt_ci(c['mean_prob_ci95'])} | {c['wins']} / {c['ties']} / {c['losses']} | {c['identical']} | "
                     f"{c['failed_total']}{' (' + fmt_counts(c['failed']) + ')' if c['failed'] else ''} | "
                     f"{fmt(c['judge_consistency'])} |")
    return lines


def _length_table(result: dict) -> list[str]:
    run = result["mode"] == "run"
    lines = [("| step " if run else "") + "| model | tokens mean | median | p10 | p90 | chars mean | median | p10 | p90 | "
             "EOS rate |", "|" + "---|" * (11 if run else 10)]
    models = sorted(result["models"].items(), key=lambda kv: kv[1].get("step", 0))
    for label, m in models:
        t, c = m["tokens"], m["chars"]
        lines.append((f"| {m['step']} " if run else "") + f"| {label} | {fmt(t['mean'], 1)} | {fmt(t['median'], 1)} | "
                     f"{fmt(t['p10'], 1)} | {fmt(t['p90'], 1)} | {fmt(c['mean'], 1)} | {fmt(c['median'], 1)} | "
                     f"{fmt(c['p10'], 1)} | {fmt(c['p90'], 1)} | {fmt(m['eos_rate'], 2)} |")
    return lines


def _samples(result: dict, n: int) -> list[str]:
    samples = result["samples"][:n]
    if not samples:
        return []
    lines = ["## Samples", "",
             f"The first {len(samples)} of {len(result['samples'])} prompts (long texts cut; every prompt, "
             f"response and judgment is in `eval.json`).", ""]
    for s in samples:
        lines += [f"### Prompt `{s['id']}`", "", _fence(_prompt_text(s["prompt"]), 500), ""]
        verdicts = {row["a"]: row for row in s["judgments"]}
        for label, text in s["responses"].items():
            note = ""
            row = verdicts.get(label)
            if row is not None:
                if row["prob_a"] is None:
                    note = f" -- judgment failed ({row['failure']})"
                else:
                    outcome = {1.0: "win", 0.5: "tie", 0.0: "loss"}[row["score"]]
                    how = "identical responses" if row["identical"] else f"P({label} better) = {row['prob_a']:.3f}"
                    note = f" -- {outcome} against {row['b']} ({how})"
            lines += [f"**{label}** ({s['tokens'][label]} tokens){note}", "", _fence(text), ""]
    return lines


def render_markdown(result: dict, plots: dict[str, str], n_samples: int = 3) -> str:
    lines = _header(result)
    if result["mode"] == "run":
        lines += ["## Win rate against the start", ""] + _comparison_table(result) + [""]
        if "win_rate" in plots:
            lines += [f"![Win rate over training steps]({plots['win_rate']})", ""]
        lines += ["## Response length", ""] + _length_table(result) + [""]
        if "length" in plots:
            lines += [f"![Response length over training steps]({plots['length']})", ""]
        if "lengths" in plots:
            lines += [f"![Length distributions]({plots['lengths']})", ""]
        tr = result.get("training")
        lines += ["## Training curves", ""]
        if tr:
            last = {k: v[-1][1] for k, v in tr["series"].items() if v}
            lines += [f"From `{tr['metrics']}` ({tr['steps']} steps). Last step: "
                      + ", ".join(f"{k} {fmt(v, 4)}" for k, v in last.items()) + ".", ""]
            if "training" in plots:
                lines += [f"![Training curves]({plots['training']})", ""]
        else:
            lines += ["The run has no metrics.jsonl.", ""]
    else:
        lines += ["## Win rate", ""] + _comparison_table(result) + [""]
        if "win_rate" in plots:
            lines += [f"![Win rate]({plots['win_rate']})", ""]
        lines += ["## Response length", ""] + _length_table(result) + [""]
        if "lengths" in plots:
            lines += [f"![Length distributions]({plots['lengths']})", ""]
    if not plots:
        lines += ["(No plots: matplotlib is not installed; `pip install 'oaif[plots]'`.)", ""]
    lines += _samples(result, n_samples)
    lines += [f"Evaluated in {result.get('seconds', 0):.1f} s.", ""]
    return "\n".join(lines)


def write_report(result: dict, out_dir: str | Path, metrics: list[dict] | None = None, n_samples: int = 3) -> dict:
    """Write the plots and ``report.md`` into ``out_dir``; returns the file names written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = make_plots(result, out, metrics)
    write_text(out / "report.md", render_markdown(result, plots, n_samples=n_samples))
    return {"report": "report.md", "eval": "eval.json", "plots": plots}
