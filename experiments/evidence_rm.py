"""Claim 3 of experiments/evidence.py (`python experiments/evidence.py rm`): on HH prompts, online DPO
with reward-model feedback against online DPO with LLM feedback, at the sized budget, judged by a
reward model trained on other HH pairs than the first and by the LLM judge.

Reward models, oaif's recipe of judge_table.py's ``reward-model-400p`` (0.587 on held-out human
labels): SmolLM2-135M-Instruct with a score head, one epoch over 400 HH harmless-base test pairs in
segments of 100 (``judge_table.train_rm``: lr 1e-5, batch 8, pairs over 384 tokens skipped).

- ``train``: pairs [500, 900) of the HH file (reward-model-400p's pairs): the feedback of run ``rm``.
- ``heldout``: pairs [900, 1300): disjoint from the first; it only judges results.

Each is measured on reward-model-400p's test pairs (the first 380 of the file) with
`oaif annotate --against-labels` (OUT/claim3/reward_models/<name>.json).

Runs (OUT/claim3/<run>/, evidence_runs.settings: LoRA r 32, lr 3e-4, 16 steps x 4 prompts x 4
samples paired all ways = 384 judged pairs), trained on the first user turns of HH dialogues 0-399:

- ``rm``: ``annotator.type=reward_model`` with the ``train`` reward model.
- ``llm``: the served judge, pointwise, the harmless rubric (judge_rubrics/pointwise_harmless.yaml).

Held-out: 128 first user turns of HH dialogues after the last one the reward models train on, to
1599, in a fixed draw, none equal to a training prompt or to the first turn of a reward-model pair.

Evaluation: each run with `oaif eval --run`, the ``train`` reward model as the judge (the training
reward model's view, every checkpoint against the start); then on the replies those evaluations
stored, final ``rm`` against final ``llm`` by the ``heldout`` reward model and by the LLM judge's
pairwise readout (both orders, oaif's ``harmless`` rubric), and each final reply against the start
by the ``heldout`` reward model.

Weights (reward models, checkpoints) are not committed. A reward model is trained in the session
that needs it: ``train`` while a run or its evaluation is left, ``heldout`` while a comparison by it
is left; so the claim splits into two sessions (the runs; then the held-out reward model and the
comparisons), each resumable.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import hh_dialogues
from common import oaif
from evidence_runs import OTHER, evaluate, evaluated, finished, head_to_head, judge, train

TRAIN_PAIRS = (500, 900)  # judge_table.py's reward-model-400p
HELDOUT_PAIRS = (900, 1300)
TEST_PAIRS = 380  # the first pairs of the file: reward-model-400p's test set
PROMPT_DIALOGUES = (0, 400)
LAST_DIALOGUE = hh_dialogues.HELD[0]  # held-out prompts come from before evidence.py's other held-out ones
RM_MAX_LENGTH = 384
RM_JUDGE_MAX_LENGTH = 2048
RUNS = ("rm", "llm")


def hh_records() -> list:
    from oaif.data.hh import load_hh_pairs

    return load_hh_pairs(hh_dialogues.HH).records


def ranges(args) -> dict[str, tuple[int, int]]:
    """Reward-model pair ranges (in the file's parsed pairs); the smoke run takes a few of each."""
    if args.smoke:
        return {"train": (500, 504), "heldout": (900, 904)}
    return {"train": TRAIN_PAIRS, "heldout": HELDOUT_PAIRS}


def prompt_files(d: Path, args) -> tuple[Path, Path]:
    """d/train_prompts.jsonl (first turns of HH dialogues 0-399) and d/heldout_prompts.jsonl (written once)."""
    train_p, held_p = d / "train_prompts.jsonl", d / "heldout_prompts.jsonl"
    if not train_p.exists():
        rows = hh_dialogues.first_turns(*PROMPT_DIALOGUES, path=hh_dialogues.HH)
        train_p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    if not held_p.exists():
        records = hh_records()
        taken = [r for lo, hi in ranges(args).values() for r in records[lo:hi]]
        first = 1 + max(int(r.id) for r in records[:HELDOUT_PAIRS[1]])
        seen = {json.loads(x)["prompt"] for x in train_p.read_text().splitlines()} | \
               {r.prompt[0]["content"] for r in taken}
        pool = [r for r in hh_dialogues.first_turns(first, LAST_DIALOGUE, path=hh_dialogues.HH) if r["prompt"] not in seen]
        rows, texts = [], set()
        for r in hh_dialogues.shuffled(pool, "evidence-rm-heldout"):
            if r["prompt"] not in texts:
                rows.append(r)
                texts.add(r["prompt"])
        held_p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[:128]))
    return train_p, held_p


def reward_model(args, d: Path, name: str, log: Path) -> Path:
    """The reward model ``name`` trained (again, if its weights are gone) and its agreement with the HH
    labels of the test pairs measured once. Returns the model's directory."""
    import judge_table
    from oaif.data.preferences import save_preferences

    work = d / "reward_models" / name
    model = work / "reward_model"
    if not any(model.glob("*.safetensors")):
        for stale in (model, work / "reward_model_segments"):
            shutil.rmtree(stale, ignore_errors=True)
        lo, hi = ranges(args)[name]
        judge_table.train_rm(work, hh_dialogues.HH, lo, hi - lo, RM_MAX_LENGTH, args.model, min(100, hi - lo), 1e-5)
    summary = d / "reward_models" / f"{name}.json"
    if not summary.exists():
        test = work / "test_pairs.jsonl"
        save_preferences(test, hh_records()[:4 if args.smoke else TEST_PAIRS])
        oaif("annotate", str(test), "--against-labels", "--no-progress", *sets_of(model),
             "--report", str(work / "agreement.json"), log=log)
        report = json.loads((work / "agreement.json").read_text())
        trained = json.loads((model / "oaif_reward_model.json").read_text())
        summary.write_text(json.dumps({"name": name, "trained": trained, "agreement": {
            k: report.get(k) for k in ("agreement", "agreement_ci95", "pairs", "judged", "ties", "failed_total")}},
            indent=2) + "\n")
    return model


def rm_judge(model: Path) -> list[str]:
    return ["type=reward_model", f"model={model}", f"max_length={RM_JUDGE_MAX_LENGTH}"]


def sets_of(model: Path) -> list[str]:
    return [x for s in rm_judge(model) for x in ("--set", s)]


# final or start replies of two runs, compared by the held-out reward model; then by the LLM judge
BY_HELDOUT_RM = {"rm_vs_llm_by_heldout_rm": (("rm", "final"), ("llm", "final")),
                 "rm_vs_start_by_heldout_rm": (("rm", "final"), ("rm", "start")),
                 "llm_vs_start_by_heldout_rm": (("llm", "final"), ("llm", "start"))}
BY_LLM = "rm_vs_llm_by_llm"


def claim_rm(args, server, log: Path) -> None:
    d = args.out / "claim3"
    d.mkdir(parents=True, exist_ok=True)
    train_p, held_p = prompt_files(d, args)
    if not all(finished(d / run, args.steps) and evaluated(d / run) for run in RUNS):
        rm_train = reward_model(args, d, "train", log)
        llm_sets, llm_env = judge(args, server, "harmless", "pointwise")
        for run, overrides, env in (("rm", [f"annotator.{s}" for s in rm_judge(rm_train)], {}),
                                    ("llm", [f"annotator.{s}" for s in llm_sets], llm_env)):
            evaluate(args, train(args, d / run, train_p, overrides, env, log), held_p, rm_judge(rm_train), log)
    todo = {name: pair for name, pair in BY_HELDOUT_RM.items() if not (d / name / "report.json").exists()}
    if todo:
        rm_heldout = reward_model(args, d, "heldout", log)
        for name, ((ra, wa), (rb, wb)) in todo.items():
            head_to_head(d / name, (d / ra, wa), (d / rb, wb), rm_judge(rm_heldout), log)
    sets, env = judge(args, server, "harmless", OTHER["pointwise"])
    head_to_head(d / BY_LLM, (d / "rm", "final"), (d / "llm", "final"), sets, log, env)
