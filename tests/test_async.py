"""``train.async_steps``: the background worker samples and judges the next step while this one updates.

Real tiny Llama, real files, the rule judge (``prefer_shorter``); the worker is a real thread. The
vLLM backends with ``async_steps=1`` run in ``test_vllm_colocated_trainer.py`` and ``test_vllm_trainer.py``,
two gloo processes in ``test_distributed.py``.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import doc_oaif_args, one_line_error
from oaif.config import load_config
from oaif.errors import AnnotatorError, ConfigError
from oaif.generation.weights import policy_weights
from oaif.models.load import load_causal_lm
from oaif.run.metrics import read_metrics
from oaif.step.sampling import sample_responses
from oaif.trainer import Trainer, train

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo.yaml"
SHORTER = "oaif.annotators.rules:prefer_shorter"


def args(model_dir, out, *extra) -> list[str]:
    return [f"model.name_or_path={model_dir}", "annotator.type=callable", f"annotator.callable={SHORTER}",
            f"train.output_dir={out}", "train.max_steps=4", "train.batch_size=2", "sampling.max_new_tokens=10",
            "optim.lr=2.0e-2", "optim.warmup_steps=0", "logging.progress_bar=false",
            f"data.path={ROOT / 'data/prompts/demo_prompts.jsonl'}", *extra]


def cfg(model_dir, out, *extra):
    return load_config(DEMO, args(model_dir, out, *extra))


def untimed(records: list[dict]) -> list[dict]:
    """Metrics lines without the wall-clock keys (seconds and rates differ between any two runs)."""
    return [{k: v for k, v in r.items() if not k.startswith("time_") and not k.endswith("_per_s")} for r in records]


def audit(run: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run / "annotations.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k != "latency_s"} for line in lines]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def worker_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("oaif-async")]


def test_async_steps_0_is_the_synchronous_loop(tiny_model_dir, tmp_path):
    train(cfg(tiny_model_dir, tmp_path / "plain", "train.max_steps=2"))
    train(cfg(tiny_model_dir, tmp_path / "zero", "train.max_steps=2", "train.async_steps=0"))
    plain, zero = read_metrics(tmp_path / "plain" / "metrics.jsonl"), read_metrics(tmp_path / "zero" / "metrics.jsonl")
    assert untimed(plain) == untimed(zero)
    assert [r["policy_lag"] for r in zero] == [0, 0] and all("time_wait_s" not in r for r in zero)
    # every judgment line names the weights that sampled it: the policy before the step
    assert [a["policy_version"] for a in audit(tmp_path / "zero")] == [a["step"] - 1 for a in audit(tmp_path / "zero")]
    a, b = weights(tmp_path / "plain" / "checkpoint-2"), weights(tmp_path / "zero" / "checkpoint-2")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_async_steps_1_is_deterministic_one_step_stale_and_leaves_no_thread(tiny_model_dir, tmp_path):
    sync = tmp_path / "sync"
    train(cfg(tiny_model_dir, sync))
    runs = [tmp_path / "a", tmp_path / "b"]
    _, _, *documented = doc_oaif_args("oaif train configs/demo.yaml train.async_steps=1")  # docs/async.md's key
    for run in runs:
        train(cfg(tiny_model_dir, run, *documented))
        assert worker_threads() == []  # the worker ended with the run
    first, second = (read_metrics(run / "metrics.jsonl") for run in runs)
    assert untimed(first) == untimed(second)
    assert audit(runs[0]) == audit(runs[1])
    wa, wb = weights(runs[0] / "checkpoint-4"), weights(runs[1] / "checkpoint-4")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [r["policy_lag"] for r in first] == [0, 1, 1, 1]
    assert all(r["time_wait_s"] >= 0 for r in first)
    # step s trains on a batch sampled after step max(s - 2, 0): steps 1 and 2 from the start, 3 from step 1's weights
    assert sorted({(a["step"], a["policy_version"]) for a in audit(runs[0])}) == [(1, 0), (2, 0), (3, 1), (4, 2)]
    # the same prompts in the same order as the synchronous run; step 1 (same weights) is the same step
    assert [r["prompts_seen"] for r in first] == [r["prompts_seen"] for r in read_metrics(sync / "metrics.jsonl")]
    assert [a["prompt_id"] for a in audit(runs[0])] == [a["prompt_id"] for a in audit(sync)]
    assert untimed(first)[0] == untimed(read_metrics(sync / "metrics.jsonl"))[0]
    assert [a for a in audit(runs[0]) if a["step"] == 1] == [a for a in audit(sync) if a["step"] == 1]


def test_the_documented_rule_judge_run_shortens_responses_one_step_stale(tiny_model_dir, tmp_path):
    # docs/async.md's rule-judge command (its config, judge, steps and async_steps), on the tiny model
    _, config, *documented = doc_oaif_args("oaif train configs/demo.yaml train.async_steps=1 train.max_steps=5 "
                                           "annotator.type=callable annotator.callable=oaif.annotators.rules:prefer_shorter")
    out = tmp_path / "run"
    model = [f"model.name_or_path={tiny_model_dir}", f"train.output_dir={out}", "train.batch_size=2",
             "sampling.max_new_tokens=10", "optim.lr=2.0e-2", "optim.warmup_steps=0", "logging.progress_bar=false",
             f"data.path={ROOT / 'data/prompts/demo_prompts.jsonl'}"]
    train(load_config(ROOT / config, [*model, *documented]))
    records = read_metrics(out / "metrics.jsonl")
    assert [r["policy_lag"] for r in records] == [0, 1, 1, 1, 1]
    assert all(r["pairs_used"] + r["pairs_masked"] == 2 for r in records)  # the rule never fails


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_the_third_step_trains_on_responses_of_the_first_steps_weights(tiny_model_dir, tmp_path, lora):
    extra = ["model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=8"] if lora else []
    config = cfg(tiny_model_dir, tmp_path / "run", "train.max_steps=3", "train.async_steps=1", "optim.lr=5.0e-2", *extra)
    t = Trainer(config).setup()
    collected, snapshots = {}, []
    book = t.book  # observe what each step trains on (the trainer's own method still does the work)
    t.book = lambda c, metrics: (collected.setdefault(t.step + 1, c), book(c, metrics))[1]
    try:
        for _ in range(3):
            snapshots.append({k: v.clone() for k, v in policy_weights(t.unwrapped)})  # LoRA: merged
            t.run_step()
    finally:
        t.close()
    third = collected[3]
    assert third.version == 1

    def responses(state):
        model = load_causal_lm(tiny_model_dir)[0]
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert missing == ["lm_head.weight"] and not unexpected  # tied to the embeddings
        s = config.sampling
        return sample_responses(model, t.tokenizer, third.rollouts.prompt_tokens, third.rollouts.positions,
                                k=s.num_samples, seed=config.train.seed, temperature=s.temperature, top_p=s.top_p,
                                max_new_tokens=s.max_new_tokens)[0]

    assert third.rollouts.responses == responses(snapshots[1])  # the weights after step 1
    assert third.rollouts.responses != responses(snapshots[2])  # not those after step 2, which the step updated


def test_a_resumed_run_trains_on_the_saved_batch_and_equals_the_uninterrupted_run(tiny_model_dir, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    train(cfg(tiny_model_dir, full, "train.async_steps=1", "train.save_every=2", "train.keep_last=0"))
    saved = torch.load(full / "checkpoint-2" / "trainer_state.pt", weights_only=True)
    assert saved["stream"]["position"] == 4 and saved["async"]["stream_after"]["position"] == 6
    assert len(saved["async"]["ranks"][0]) == 1  # step 3's batch, sampled from step 1's weights
    train(cfg(tiny_model_dir, part, "train.async_steps=1", f"train.resume={full / 'checkpoint-2'}"))
    wa, wb = weights(full / "checkpoint-4"), weights(part / "checkpoint-4")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    resumed = read_metrics(part / "metrics.jsonl")
    assert untimed(resumed) == untimed(read_metrics(full / "metrics.jsonl"))[2:]
    assert [r["policy_lag"] for r in resumed] == [1, 1]
    assert audit(part) == [a for a in audit(full) if a["step"] > 2]


def test_a_resume_after_an_error_draws_the_queued_prompts_again(tiny_model_dir, tmp_path):
    from oaif.annotators.callable_judge import CallableJudge

    calls = []

    def interrupted(prompt, response):  # Ctrl-C in the worker while it judges step 4's batch (2 calls a pair)
        calls.append(1)
        if len(calls) > 12:
            raise KeyboardInterrupt
        return -float(len(response.split()))

    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(cfg(tiny_model_dir, out, "train.async_steps=1"), annotator=CallableJudge(interrupted))
    assert worker_threads() == []
    assert (out / "latest").read_text().strip() == "checkpoint-3"  # the progress, saved after the error
    state = torch.load(out / "checkpoint-3" / "trainer_state.pt", weights_only=True)
    assert "async" not in state and state["stream"]["position"] == 6  # no queued batch: as of the last step
    train(cfg(tiny_model_dir, out, "train.async_steps=1", "train.resume=true"))
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4] and [r["prompts_seen"] for r in records] == [2, 4, 6, 8]
    assert [r["policy_lag"] for r in records] == [0, 1, 1, 0]  # step 4 drawn again, from the resumed weights


class Exploding:
    """An annotator that raises: the error the synchronous loop would raise must reach the caller unchanged."""

    def annotate(self, requests):
        raise AnnotatorError("the judge exploded")


@pytest.mark.parametrize("steps", [0, 1])
def test_an_annotator_error_in_the_worker_is_the_synchronous_error(tiny_model_dir, tmp_path, steps):
    with pytest.raises(AnnotatorError, match="^the judge exploded$"):
        train(cfg(tiny_model_dir, tmp_path / "run", f"train.async_steps={steps}"), annotator=Exploding())
    assert worker_threads() == []
    assert not (tmp_path / "run" / "latest").exists()  # it failed in step 1: nothing to save


def test_failed_judgments_in_the_worker_are_counted_as_in_the_synchronous_loop(tiny_model_dir, tmp_path):
    judge = f"annotator.callable={ROOT / 'tests' / 'test_trainer.py'}:failing_judge"
    for steps in (0, 1):
        out = tmp_path / str(steps)
        with pytest.raises(AnnotatorError, match="failed on 100% of the last 4 pairs.*callable_error: 4"):
            train(cfg(tiny_model_dir, out, judge, "annotator.failure_window=4", f"train.async_steps={steps}"))
        assert [r["pairs_failed"] for r in read_metrics(out / "metrics.jsonl")] == [2, 2]
        assert (out / "latest").read_text().strip() == "checkpoint-2"


@pytest.mark.parametrize("extra, words", [
    (["annotator.type=llm", "annotator.model=policy"], "annotator.model=policy judges with the policy"),
    (["loss.reference=behavior"], "loss.reference=behavior takes the policy before the step"),
    (["train.mode=offline", "data.preference_path=x.jsonl"], "offline mode samples and judges nothing"),
    (["train.async_steps=-1"], "must be >= 0"),
    (["train.fsdp=true"], "not yet with train.fsdp"),
])
def test_what_async_steps_cannot_do_is_refused_in_one_line(tiny_model_dir, tmp_path, capsys, extra, words):
    overrides = ["train.async_steps=1", *extra]
    with pytest.raises(ConfigError, match=f"^train.async_steps: {words}"):
        load_config(DEMO, overrides)
    line = one_line_error(capsys, ["train", str(DEMO), *args(tiny_model_dir, tmp_path / "run", *overrides)])
    assert line.startswith("oaif: error: train.async_steps: ") and words in line
    assert not (tmp_path / "run").exists()


class Recorder:
    """A real judge (here an ensemble of rule judges) whose calls are kept in order: the test's ground truth
    of which judgments exist when (the worker judges a step ahead)."""

    def __init__(self, judge):
        self.judge, self.name, self.calls = judge, judge.name, []

    def annotate(self, requests):
        out = self.judge.annotate(requests)
        self.calls.append(out)
        return out


def test_ensemble_agreement_counts_the_judgments_each_step_trained_on(tiny_model_dir, tmp_path):
    from oaif.annotators.callable_judge import CallableJudge
    from oaif.annotators.ensemble import AgreementTally, EnsembleJudge
    from oaif.annotators.rules import prefer_no_digits, prefer_shorter

    judge = Recorder(EnsembleJudge([CallableJudge(prefer_shorter), CallableJudge(prefer_no_digits)]))
    out = tmp_path / "run"
    train(cfg(tiny_model_dir, out, "train.max_steps=6", "train.async_steps=1", "sampling.num_samples=3",
              "sampling.pairing=all"),
          annotator=judge)
    records = read_metrics(out / "metrics.jsonl")
    assert len(judge.calls) == 6  # one micro-batch a step; call i is step i's batch, judged during step i - 1

    def through(n: int) -> dict:
        tally = AgreementTally()
        for call in judge.calls[:n]:
            tally.add(call)
        return {f"judge_agreement/{k}": v for k, v in tally.values().items()}

    for r in records:
        logged = {k: v for k, v in r.items() if k.startswith("judge_agreement/")}
        assert logged and logged == pytest.approx(through(r["step"]))
    # the check can fail: counting the batch judged ahead gives other numbers at some step
    assert any(through(s) != pytest.approx(through(s + 1)) for s in range(1, 6))


def test_a_sampler_on_the_trainers_device_samples_the_next_batch_before_the_update(tiny_model_dir, tmp_path):
    """The transformers backends share the trainer's device: each update starts only after the worker has drawn
    the next step's responses, so that the update overlaps the judge and not the sampler."""
    import time

    t = Trainer(cfg(tiny_model_dir, tmp_path / "run", "train.async_steps=1")).setup()
    assert t.sampler_shares_device
    sampled_at, updates_at = [], []
    sample = t.actor.sample

    class TimedUpdate:  # the trainer's own update, its start times noted
        def __init__(self, update):
            self.update = update

        def __getattr__(self, name):
            return getattr(self.update, name)

        def __call__(self, *args, **kwargs):
            updates_at.append(time.perf_counter())
            return self.update(*args, **kwargs)

    t.actor.sample = lambda batch: (sample(batch), sampled_at.append(time.perf_counter()))[0]
    t.update = TimedUpdate(t.update)
    try:
        for _ in range(4):
            t.run_step()
    finally:
        t.close()
    assert len(sampled_at) == 4 and len(updates_at) == 4
    # step s's update (s = 1..3) after the drawing of step s + 1's batch; the last step has no next batch
    assert all(updates_at[s] >= sampled_at[s + 1] for s in range(3)), (sampled_at, updates_at)


def test_wait_sampled_waits_only_when_the_worker_would_sample_next():
    import threading
    import time

    from oaif.run.async_collect import AsyncCollector

    release = threading.Event()

    def gather(prompts, version, on_sampled):
        if prompts == ["slow"]:
            release.wait(10)  # an older step still being collected
        on_sampled()
        return prompts

    ahead = AsyncCollector(2, gather, lambda weights: None, version=0)
    try:
        batches = iter([[["slow"]], [["next"]], [["later"]]])
        ahead.fill(lambda: next(batches), dict, steps_left=3)
        started = time.perf_counter()
        assert ahead.wait_sampled() < 0.5 and time.perf_counter() - started < 0.5  # "slow" is not collected yet
        release.set()
        assert ahead.next_step()[0] == [["slow"]]
        ahead._steps[0].futures[0].result()  # "next" collected
        ahead.wait_sampled()  # now every older step is collected: the newest one's drawing is awaited
        assert ahead._steps[-1].sampled.is_set()
    finally:
        ahead.close()
