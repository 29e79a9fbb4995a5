"""``train.async_steps``: the next steps' batches sampled and judged while this step updates.

One background thread (:class:`AsyncCollector`) runs two kinds of job in the order they were
queued: *collect* (sample, annotate and build the pairs of one micro-batch, from the weights the
sampler holds then) and *push* (give the sampler the policy's newest weights). The main thread
keeps everything else: it draws every prompt from the stream, in stream order, so the per-row
seeds are those of the synchronous loop; it does every collective call, the metrics and the audit
log. With ``N = train.async_steps`` it keeps ``N + 1`` steps' batches queued at the start of a
step, so the batch queued at the start of step ``t`` is trained on at step ``t + N``; the push of
the weights after step ``t - 1`` was queued before it, so it is sampled from them: the batch of
step ``s`` comes from the weights after step ``s - N - 1`` (``policy_lag = N``, fewer on the first
steps, which all sample the starting weights). The main thread lists the weights to push when it
queues the push (a LoRA adapter merged then, out of place, while no reference forward has its
adapter switched off); a full model's are its live parameters, so the main thread waits for the
push to finish before its next optimizer step changes them.

A checkpoint (every process calls :meth:`AsyncCollector.checkpoint_state` in :func:`oaif.run.saving.save`)
waits for the queued batches and keeps them, as plain lists, in ``trainer_state.pt`` under
``async``, with the stream position after them: a resumed run trains on them as the uninterrupted
run would have, and then equals it. A checkpoint saved after an error (no collective call is safe
then) keeps none: the stream state it saves is as of the last finished step, so the queued prompts
are drawn again on resume, from the resumed weights (``policy_lag`` 0 at that step). A batch
whose job failed is never saved; neither is any batch after it.
"""

from __future__ import annotations

import dataclasses

import threading
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from oaif.annotators.base import Judgment, PairRequest
from oaif.step.records import Collected, PairPlan, PreferenceBatch, Rollouts


KEPT_EXTRA = ("label_mass", "members")  # the metrics' label mass; an ensemble's member probabilities (agreement)


def to_plain(c: Collected) -> dict[str, Any]:
    """``c`` as lists, dicts, strings and numbers (what ``torch.load(weights_only=True)`` reads back).
    Of a judgment's ``extra`` only what the books read after collection is kept (:data:`KEPT_EXTRA`)."""
    r, p, b = c.rollouts, c.plan, c.prefs
    return {
        "rollouts": {f.name: getattr(r, f.name) for f in dataclasses.fields(r)},  # every field, plain lists
        "plan": {"pairs": [list(x) for x in p.pairs], "identical": p.identical,
                 "requests": [[q.prompt, q.a, q.b, q.prompt_id] for q in p.requests]},
        "judgments": [{"prob": j.prob, "failure": j.failure, "prob_ab": j.prob_ab, "prob_ba": j.prob_ba,
                       "latency_s": j.latency_s, "judge": j.judge,
                       "extra": {k: v for k, v in j.extra.items() if k in KEPT_EXTRA}} for j in c.judgments],
        "prefs": {"chosen": b.chosen, "rejected": b.rejected, "label_probs": b.label_probs, "masked": dict(b.masked),
                  "failed": dict(b.failed), "comparisons": b.comparisons},
        "version": c.version, "time_sample_s": c.time_sample_s, "time_annotate_s": c.time_annotate_s,
    }


def from_plain(d: dict[str, Any]) -> Collected:
    """The inverse of :func:`to_plain`."""
    p, b = d["plan"], d["prefs"]
    plan = PairPlan([tuple(x) for x in p["pairs"]], [PairRequest(*q) for q in p["requests"]], p["identical"])
    prefs = PreferenceBatch(b["chosen"], b["rejected"], b["label_probs"], Counter(b["masked"]), Counter(b["failed"]),
                            b["comparisons"])
    return Collected(Rollouts(**d["rollouts"]), plan, [Judgment(**j) for j in d["judgments"]], prefs, d["version"],
                     d["time_sample_s"], d["time_annotate_s"])


@dataclass
class _Step:
    """One step's queued micro-batches, the stream's state before their prompts were drawn, and whether the
    first micro-batch's responses are drawn (set also when its job fails)."""

    futures: list[Future]
    stream_before: dict
    sampled: threading.Event = field(default_factory=threading.Event)


def _same_threads(n: int) -> None:
    """The worker computes with the main thread's torch thread count. A new thread starts with OpenMP's default
    thread count, not what ``torch.set_num_threads`` gave the main thread, and vLLM's CPU attention aborts the
    process when the two counts it reads differ ("Check failed: ... thread_num"). vLLM's CPU engine replaces
    ``torch.set_num_threads`` with a no-op once it starts, so torch's own setter (``torch._C``) is called."""
    torch._C.set_num_threads(n)  # sets this thread's OpenMP count too (a new thread has OpenMP's default)


def _done(value) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


class AsyncCollector:
    """The background worker of ``train.async_steps`` (see the module's doc).

    ``gather(prompts, version, on_sampled)`` collects one micro-batch (run in the worker; ``on_sampled`` is
    called when its responses are drawn, or None); ``load(weights)`` gives the
    sampler the weights :meth:`push` was handed (run in the worker); ``version`` is the step of the
    weights the sampler holds now.
    """

    def __init__(self, steps_ahead: int, gather: Callable[[list, int], Collected], load: Callable[[list], Any], *,
                 version: int):
        self.ahead, self._gather, self._load = steps_ahead, gather, load
        self.sampler_version = version  # written by push jobs, read by collect jobs: both in the worker
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="oaif-async", initializer=_same_threads,
                                        initargs=(torch.get_num_threads(),))
        self._steps: deque[_Step] = deque()
        self._push: Future | None = None

    # -- jobs (in the worker) ---------------------------------------------------------------
    def _collect(self, prompts: list, sampled: threading.Event | None) -> Collected:
        try:
            return self._gather(prompts, self.sampler_version, sampled.set if sampled is not None else None)
        finally:
            if sampled is not None:
                sampled.set()

    def _push_job(self, version: int, weights: list) -> float:
        started = time.perf_counter()
        self._load(weights)
        self.sampler_version = version
        return time.perf_counter() - started

    # -- the main thread ----------------------------------------------------------------------
    def fill(self, draw: Callable[[], list[list]], stream_state: Callable[[], dict], steps_left: int) -> None:
        """Queue steps until ``steps_ahead + 1`` are queued (no more than ``steps_left``): ``draw()`` gives one
        step's micro-batches of prompts, drawn here in stream order; each micro-batch is one collect job."""
        while len(self._steps) < min(self.ahead + 1, steps_left):
            step = _Step([], stream_state())
            step.futures = [self._pool.submit(self._collect, p, step.sampled if i == 0 else None)
                            for i, p in enumerate(draw())]
            self._steps.append(step)

    def take(self, draw: Callable[[], list[list]], stream_state: Callable[[], dict],
             steps_left: int) -> tuple[list[Collected], float]:
        """:meth:`fill` the queue, then :meth:`next_step`: this step's micro-batches and the seconds waited."""
        self.fill(draw, stream_state, steps_left)
        return self.next_step()

    def next_step(self) -> tuple[list[Collected], float]:
        """The oldest queued step's micro-batches and the seconds spent waiting for them; a job's exception is
        raised here, as it would have been raised by the synchronous loop."""
        started = time.perf_counter()
        step = self._steps.popleft()
        return [f.result() for f in step.futures], time.perf_counter() - started

    def wait_sampled(self) -> float:
        """For a sampler on the trainer's own device: wait until the worker has drawn the first micro-batch of the
        newest queued step, when every older queued step is collected already (the worker would sample next), so
        that the update runs while the judge works instead of sharing the device with the sampler; seconds
        waited. Nothing to wait for when an older step is still being collected."""
        started = time.perf_counter()
        if self._steps and all(f.done() for s in list(self._steps)[:-1] for f in s.futures):
            self._steps[-1].sampled.wait()
        return time.perf_counter() - started

    def push(self, version: int, weights: list) -> None:
        """Queue the push of ``weights``, the policy's ``(name, tensor)`` pairs after step ``version``."""
        self._push = self._pool.submit(self._push_job, version, weights)

    def wait_push(self) -> tuple[float, float]:
        """Wait for the last queued push (it may read the live weights: call this before the optimizer changes
        them); ``(its seconds in the worker, seconds waited)``, zeros when none is queued."""
        if self._push is None:
            return 0.0, 0.0
        started, push, self._push = time.perf_counter(), self._push, None
        seconds = push.result()
        return seconds, time.perf_counter() - started

    def committed_stream(self, current: dict) -> dict:
        """The stream's state as of the last finished step: before the queued steps' prompts."""
        return self._steps[0].stream_before if self._steps else current

    # -- checkpoints --------------------------------------------------------------------------
    def _finished_prefix(self) -> list[list[dict]]:
        """The queued steps' micro-batches as plain records, up to the first step with a failed job."""
        wait([f for s in self._steps for f in s.futures])
        out = []
        for s in self._steps:
            if any(f.exception() is not None for f in s.futures):
                break
            out.append([to_plain(f.result()) for f in s.futures])
        return out

    def checkpoint_state(self, accelerator, stream_now: dict) -> dict:
        """What ``trainer_state.pt`` keeps under ``async``: every process's queued steps that finished, as
        many on each process (a collective call: every process must call it), and the stream after them."""
        mine = self._finished_prefix()
        ranks = [mine]
        if accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            ranks = gather_object([mine])
        n = min(len(r) for r in ranks)
        stream_after = self._steps[n].stream_before if n < len(self._steps) else stream_now
        return {"num_processes": len(ranks), "ranks": [r[:n] for r in ranks],
                "stream_befores": [s.stream_before for s in list(self._steps)[:n]], "stream_after": stream_after}

    def restore(self, saved: dict | None, accelerator, stream) -> int:
        """Queue a checkpoint's saved steps (``async`` of its trainer state) and move ``stream`` past them;
        the number of steps queued (0 without any, or when the checkpoint had another number of processes)."""
        if not saved or saved["num_processes"] != accelerator.num_processes or not saved["stream_befores"]:
            return 0
        mine = saved["ranks"][accelerator.process_index]
        for before, micro_batches in zip(saved["stream_befores"], mine):
            step = _Step([_done(from_plain(m)) for m in micro_batches], before)
            step.sampled.set()  # collected before the checkpoint
            self._steps.append(step)
        stream.load_state_dict(saved["stream_after"])
        return len(mine)

    def close(self) -> None:
        """Drop the jobs not started, wait for the running one, and end the worker thread."""
        self._steps.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)
