"""Per-step metrics: collected from the typed records of each micro-batch, summed across
processes over a fixed key set, written to JSONL, and optionally to trackers.

:class:`StepMetrics` is the one place where the loop's bookkeeping happens. Every process holds
the same keys (:data:`METRICS`, each a sum and a count, zero where a process saw nothing), so the
cross-process sum is one all-reduce of a fixed-shape tensor: a process whose pairs were all
tied or failed contributes zeros instead of a different shape. Failure reasons, an open set,
are gathered as objects. ``metrics.jsonl`` holds one JSON object per optimizer step; on resume,
lines past the resumed step are dropped (:func:`truncate_jsonl`) so that the file reads as one
uninterrupted run. TensorBoard and W&B load only when ``logging.report_to`` names them.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter, deque
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from oaif.errors import ConfigError

#: Every per-step metric: name -> what it measures. Means are over the unit named first
#: (pairs: pairs that entered the loss; responses: every sampled response of the step).
METRICS: dict[str, str] = {
    "loss": "pairs: the direct alignment loss (loss.type), the step's objective",
    "logratio_margin": "pairs: rho = [log pi(y_c) - log pi_ref(y_c)] - [log pi(y_r) - log pi_ref(y_r)], in nats",
    "rewards/margins": "pairs: beta * rho (TRL's rewards/margins)",
    "rewards/chosen": "pairs: beta * [log pi(y_c) - log pi_ref(y_c)]",
    "rewards/rejected": "pairs: beta * [log pi(y_r) - log pi_ref(y_r)]",
    "reward_accuracy": "pairs: fraction with rho > 0",
    "logps/chosen": "pairs: log pi(y_c | x), summed over the response's tokens",
    "logps/rejected": "pairs: log pi(y_r | x), summed over the response's tokens",
    "kl": ("responses (online, with a reference model: not simpo, not loss.reference=behavior; under TR-DPO "
           "pi_ref is the moved reference): k1 estimate of KL(pi || pi_ref), the mean over every sampled response "
           "of sum_t [log pi(y_t) - log pi_ref(y_t)]; the responses are drawn at sampling.temperature and "
           "sampling.top_p, not from pi itself, so it is exact in expectation only at temperature 1, top_p 1"),
    "response_length": "responses: tokens, EOS included",
    "response_chars": "responses: characters of the decoded text",
    "eos_rate": "responses: fraction that ended with an end-of-turn token within sampling.max_new_tokens",
    "responses_truncated": "count: offline mode's file responses cut to sampling.max_new_tokens tokens (0 online)",
    "judge_confidence": "successful judgments (online only): max(p, 1 - p)",
    "judge_consistency": "judgments read in both orders: fraction whose two orders pick the same response",
    "judge_label_mass": "LLM judgments: probability mass on the two label tokens",
    "pairs_judged": "count: pairs sent to the annotator (offline: pairs read from the file)",
    "pairs_used": "count: pairs that entered the loss",
    "pairs_masked": ("count: identical or tied pairs (never trained on); with sampling.pairing=best_worst the "
                     "identical comparisons and the prompts whose (best, worst) pair is masked"),
    "pairs_failed": "count: failed judgments (never trained on; failed/<reason> counts them by reason)",
    "masked/identical": "count: pairs of two identical responses, in tokens or text (not sent to the annotator)",
    "masked/tie": "count: pairs judged 0.5, or within loss.min_confidence of it",
    "masked/undetermined_failed": ("count (sampling.pairing=best_worst): prompts masked because fewer than two of "
                                   "their responses have a successful comparison (judgments failed)"),
    "masked/undetermined_tie": ("count (sampling.pairing=best_worst): prompts masked because their best and worst "
                                "responses score the same (every comparison tied, or every response identical)"),
    "comparisons_per_pair": ("pairs (sampling.pairing=best_worst): successful judged comparisons behind each (best, "
                             "worst) pair, K(K-1)/2 when none failed or was identical (pairs_judged / pairs_used is "
                             "what a pair cost)"),
    "logprob_gap": ("response tokens of the pairs (online, from a sampler that reports log-probs): mean |log pi(y_t) "
                    "in the update - the sampler's log-prob of y_t|, both from raw logits (no temperature or top-p), "
                    "the update's before the optimizer step; near 0 when the sampler holds the policy's weights "
                    "(float rounding), larger from stale weights (train.logprob_gap_warn)"),
    "generated_tokens": "count: response tokens sampled",
    "train_tokens": "count: tokens of the responses in pairs (forwarded with gradients)",
    "time_sample_s": "seconds sampling (mean over processes)",
    "time_annotate_s": "seconds annotating (mean over processes)",
    "time_update_s": "seconds in forward/backward passes (mean over processes)",
}
_MASKED = ("identical", "tie", "undetermined_failed", "undetermined_tie")  # masked/<reason>
_COUNTS = ("responses_truncated", "pairs_judged", "pairs_used", "pairs_masked", "pairs_failed",
           *(f"masked/{reason}" for reason in _MASKED), "generated_tokens", "train_tokens")
_TIMES = ("time_sample_s", "time_annotate_s", "time_update_s")
#: Written by the trainer beside the summed metrics.
RECORD_KEYS: dict[str, str] = {
    "step": "optimizer steps taken", "lr": "learning rate of the step", "grad_norm": "gradient norm before clipping",
    "time_step_s": "seconds for the whole step (this process)", "gen_tokens_per_s": "generated tokens per second and process (all tokens / mean sampling seconds / processes)",
    "time_weight_sync_s": ("seconds pushing the new weights into the vLLM engine or server after the step (this "
                           "process; not in time_step_s; about 0 with shared_prefill and hf, which sample the policy "
                           "itself). With train.async_steps the push runs in the background worker: the seconds of the "
                           "push this step waited for (the weights after the previous step)"),
    "policy_lag": ("optimizer steps between the weights that sampled the step's batch and the weights it updates "
                   "(0 in synchronous mode; at most train.async_steps)"),
    "time_wait_s": ("train.async_steps: seconds this process's main thread waited for the worker (the step's batch, "
                    "then the last weight push) instead of overlapping it with the update"),
    "train_tokens_per_s": "trained tokens per second and process", "prompts_seen": "prompts drawn from the stream so far",
    "failed/<reason>": "count: failed judgments of the step with this reason",
    "judge_agreement/<member>": "ensembles: how often each member agrees with the ensemble (this process)",
}


class StepMetrics:
    """One step's sums and counts over the fixed key set :data:`METRICS`.

    The ``add_*`` methods take the typed records the loop passes between its steps;
    :meth:`reduce` sums them over processes and :meth:`record` turns them into a metrics line.
    """

    def __init__(self) -> None:
        self.sums = {name: [0.0, 0.0] for name in METRICS}
        self.failed: Counter = Counter()  # failure reason -> count

    def add(self, name: str, total: float, count: float = 1.0) -> None:
        acc = self.sums[name]  # a KeyError here is a metric missing from METRICS
        acc[0] += float(total)
        acc[1] += float(count)

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(f"time_{phase}_s", time.perf_counter() - t0)

    def add_micro_batch(self, rollouts, plan, prefs, judgments=None, truncated: int = 0) -> None:
        """One micro-batch's records: its :class:`~oaif.step.records.Rollouts`, :class:`~oaif.step.records.PairPlan`,
        :class:`~oaif.step.records.PreferenceBatch` and the annotator's judgments (``None`` in offline mode,
        where the responses come from a file and ``truncated`` of them were cut to the token limit)."""
        lengths = [len(r) for rs in rollouts.responses for r in rs]
        self.add("response_length", sum(lengths), len(lengths))
        self.add("eos_rate", sum(e for es in rollouts.ended_eos for e in es), len(lengths))
        self.add("response_chars", sum(len(t) for ts in rollouts.texts for t in ts), len(lengths))
        self.add("responses_truncated", truncated)
        for j in judgments or []:
            if j.ok:
                self.add("judge_confidence", max(j.prob, 1 - j.prob))
                if j.consistent is not None:
                    self.add("judge_consistency", float(j.consistent))
                if "label_mass" in j.extra:
                    self.add("judge_label_mass", j.extra["label_mass"])
        if judgments is not None:
            self.add("generated_tokens", sum(lengths))
        self.add("pairs_judged", len(plan.pairs))
        self.add("pairs_used", prefs.size)
        self.add("pairs_masked", sum(prefs.masked.values()))
        self.add("pairs_failed", sum(prefs.failed.values()))
        for reason in _MASKED:
            self.add(f"masked/{reason}", prefs.masked.get(reason, 0))
        if prefs.comparisons:
            self.add("comparisons_per_pair", sum(prefs.comparisons), len(prefs.comparisons))
        self.failed.update(prefs.failed)

    def add_update(self, stats) -> None:
        """An :class:`oaif.step.update.UpdateStats`: per-pair and per-response values of one micro-batch."""
        out = stats.loss
        if out is not None and out.losses.numel():
            for name, values in (("loss", out.losses), ("logratio_margin", out.margins),
                                 ("rewards/margins", out.chosen_rewards - out.rejected_rewards),
                                 ("reward_accuracy", (out.margins > 0).float()),
                                 ("rewards/chosen", out.chosen_rewards), ("rewards/rejected", out.rejected_rewards),
                                 ("logps/chosen", stats.chosen_logps), ("logps/rejected", stats.rejected_logps)):
                self.add(name, float(values.double().sum()), values.numel())
        if stats.kl is not None and stats.kl.numel():
            self.add("kl", float(stats.kl.double().sum()), stats.kl.numel())
        if stats.logprob_gap[1]:
            self.add("logprob_gap", *stats.logprob_gap)
        self.add("train_tokens", stats.train_tokens)

    def reduce(self, accelerator) -> "StepMetrics":
        """The sums over every process (itself with one process). Every process must call it."""
        if accelerator is None or accelerator.num_processes == 1:
            return self
        import torch
        from accelerate.utils import gather_object

        names = list(METRICS)
        t = torch.tensor([self.sums[k] for k in names], dtype=torch.float64, device=accelerator.device)
        t = accelerator.reduce(t, reduction="sum").cpu().tolist()
        out = StepMetrics()
        out.sums = {k: [float(s), float(c)] for k, (s, c) in zip(names, t)}
        for counter in gather_object([dict(self.failed)]):
            out.failed.update(counter)
        return out

    def mean(self, name: str) -> float | None:
        s, c = self.sums[name]
        return s / c if c else None

    def total(self, name: str) -> float:
        return self.sums[name][0]

    def record(self, num_processes: int = 1) -> dict[str, Any]:
        """The summed metrics as a metrics line: means where something was measured, counts, times."""
        rec: dict[str, Any] = {}
        for name in METRICS:
            if name in _TIMES:
                rec[name] = self.total(name) / num_processes
            elif name in _COUNTS:
                rec[name] = int(self.total(name))
            elif (value := self.mean(name)) is not None:
                rec[name] = value
        rec.update({f"failed/{reason}": n for reason, n in sorted(self.failed.items())})
        if rec["time_sample_s"] > 0 and rec["generated_tokens"]:
            rec["gen_tokens_per_s"] = rec["generated_tokens"] / rec["time_sample_s"] / num_processes
        if rec["time_update_s"] > 0:
            rec["train_tokens_per_s"] = rec["train_tokens"] / rec["time_update_s"] / num_processes
        return rec


#: train.logprob_gap_warn=null: the threshold when policy and sampler compute in float32, and otherwise. A
#: synchronous run's gap measured about 1e-6 in float32 (SmolLM2-135M, vLLM against transformers on the tiny
#: Llama) and up to 0.036 under bf16 autocast (SmolLM2-135M, CPU); one missed step at lr 1e-5 gave 0.014.
GAP_WARN_FLOAT32, GAP_WARN_LOW_PRECISION = 1e-3, 0.1


def gap_warn_limit(cfg, policy) -> float:
    """``train.logprob_gap_warn``, or with null the limit for the run's precision: float32 only when the policy
    computes in float32 and the sampler does too (the transformers backends, or a colocated engine in float32);
    a vLLM server's dtype is set by whoever started it, so it counts as low precision."""
    if cfg.train.logprob_gap_warn is not None:
        return cfg.train.logprob_gap_warn
    import torch

    from oaif.generation.build import policy_compute_dtype

    float32 = policy_compute_dtype(cfg, policy) == torch.float32
    if cfg.sampling.backend == "vllm":
        float32 = float32 and cfg.vllm.mode == "colocated" and cfg.vllm.dtype in ("auto", "float32")
    return GAP_WARN_FLOAT32 if float32 else GAP_WARN_LOW_PRECISION


class GapWatch:
    """Says once when a step's ``logprob_gap`` exceeds ``limit`` (:func:`gap_warn_limit`; 0: never).

    In a synchronous run the sampler holds the weights the update starts from, so the gap is float
    rounding; a gap over the limit means the sampler sampled other weights."""

    def __init__(self, limit: float):
        self.limit, self.warned = limit, False

    def warning(self, record: dict) -> str | None:
        gap = record.get("logprob_gap")
        if self.warned or not self.limit or gap is None or gap <= self.limit:
            return None
        self.warned = True
        return (f"logprob_gap {gap:.4g} > {self.limit:g}: the sampler's weights differ from the policy's (a missed "
                f"weight push?) at step {record.get('step')}; in a synchronous run the sampler holds the weights the "
                f"update starts from and the gap is rounding (train.logprob_gap_warn sets the threshold, 0: no warning)")


class FailureWindow:
    """Whether each of the most recent judged pairs failed, failure reasons, and the usable pairs so far.

    Only this process's steps count: a resumed run starts with an empty window (the checkpoint's
    failures happened before the restart, perhaps against a server that has been fixed since), so
    it is judged on the pairs it sees itself. The reasons are kept for the message.
    """

    def __init__(self, size: int):
        self.window: deque[bool] = deque(maxlen=size)
        self.reasons: Counter = Counter()
        # this process's steps, and their pairs: used (entered the loss), and not, by why (all processes summed)
        self.steps = self.used = 0
        self.unusable: Counter = Counter()  # identical, tie, failed; failed/<reason> by reason

    def add(self, step: StepMetrics) -> None:
        failed, judged = int(step.total("pairs_failed")), int(step.total("pairs_judged"))
        self.window.extend([True] * failed + [False] * (judged - failed))
        self.reasons.update(step.failed)
        self.steps += 1
        self.used += int(step.total("pairs_used"))
        self.unusable.update({"identical": int(step.total("masked/identical")), "tie": int(step.total("masked/tie")),
                              "undetermined": int(step.total("masked/undetermined_failed")
                                                  + step.total("masked/undetermined_tie")),
                              "failed": failed})
        self.unusable.update({f"failed/{k}": v for k, v in step.failed.items()})

    def exceeded(self, limit: float, partial: bool = False) -> str | None:
        """What went wrong, in words, when more than ``limit`` of the last full window failed; else None.

        ``partial`` (at the end of a run): also judge a window that is not full, over the pairs it holds.
        """
        n = len(self.window)
        if n and (n == self.window.maxlen or partial) and sum(self.window) / n > limit:
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.reasons.items()))
            return (f"the annotator failed on {sum(self.window) / n:.0%} of the last {n} "
                    f"pairs (over annotator.max_failure_rate={limit}; reasons so far: {reasons})")
        return None

    def unused(self) -> str | None:
        """What happened to the pairs, in words, when this process's steps trained on none of them (the
        policy did not change: every pair identical, tied or failed); None when a pair was used."""
        if not self.steps or self.used:
            return None
        n = self.unusable
        failed = ", ".join(f"{k.split('/', 1)[1]}: {v}" for k, v in sorted(n.items()) if k.startswith("failed/"))
        parts = [f"{n['identical']} pairs of identical responses" if n["identical"] else "",
                 f"{n['tie']} tied (or under loss.min_confidence)" if n["tie"] else "",
                 f"{n['undetermined']} prompts without a best and a worst response" if n["undetermined"] else "",
                 f"{n['failed']} failed ({failed})" if n["failed"] else ""]
        return (f"no pair was usable in the {self.steps} step{'s' if self.steps > 1 else ''} of this run, so the "
                f"policy did not change: {', '.join(p for p in parts if p) or 'no pairs'}")

    def state_dict(self) -> dict[str, Any]:
        return {"window": list(self.window), "reasons": dict(self.reasons)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reasons.update(state["reasons"])  # the window is not carried over (see the class doc)


def truncate_jsonl(path: Path, step: int) -> None:
    """Keep the lines of a JSONL file whose ``step`` is at most ``step``; drop a torn last line."""
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            break  # a torn last line from a killed run
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(k + "\n" for k in keep))
    os.replace(tmp, path)


def open_step_log(path: Path, resume_step: int | None):
    """Open a per-step JSONL file for appending: emptied for a new run, cut after ``resume_step`` on resume."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        if resume_step is None:
            path.unlink()
        else:
            truncate_jsonl(path, resume_step)
    return open(path, "a", buffering=1)


class MetricsWriter:
    """Appends one JSON line per step; forwards to TensorBoard / W&B when asked."""

    def __init__(self, path: str | Path, report_to: list[str] = (), run_name: str = "oaif", config: dict | None = None,
                 resume_step: int | None = None):
        self.path = Path(path)
        self._file = open_step_log(self.path, resume_step)
        self._trackers: list[Any] = []
        for name in report_to:
            if name == "tensorboard":
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:
                    raise ConfigError("logging.report_to=tensorboard needs `pip install oaif[tensorboard]`") from None
                self._trackers.append(("tensorboard", SummaryWriter(str(self.path.parent / "tensorboard"))))
            elif name == "wandb":
                try:
                    import wandb
                except ImportError:
                    raise ConfigError("logging.report_to=wandb needs `pip install oaif[wandb]`") from None
                self._trackers.append(("wandb", wandb.init(name=run_name, config=config or {}, resume="allow")))

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        step = record.get("step", 0)
        for kind, tracker in self._trackers:
            scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            if kind == "tensorboard":
                for k, v in scalars.items():
                    tracker.add_scalar(k, v, step)
            else:
                tracker.log(scalars, step=step)

    def close(self) -> None:
        self._file.close()
        for kind, tracker in self._trackers:
            if kind == "tensorboard":
                tracker.close()
            else:
                tracker.finish()


def read_metrics(path: str | Path) -> list[dict]:
    """All records of a metrics.jsonl file (a torn last line is ignored)."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out
