"""Steps 1-3 of the loop for one micro-batch of prompts: sample, annotate, build pairs.

:class:`Actor` holds what those steps need (the sampler, the annotator, the policy and reference
they may run on) and returns a :class:`oaif.step.records.Collected`. It keeps no books and makes no
cross-process call, so the ``train.async_steps`` worker can run it while the main thread updates;
:class:`oaif.trainer.Trainer` books the result (metrics, audit log) on the main thread.

Under ``train.fsdp`` the transformers samplers and an in-process judge run on the policy (and the
reference) gathered whole for the phase, since their number of forwards differs between processes.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Callable

from oaif.annotators.base import Judgment
from oaif.models.sharding import gathered
from oaif.step.pairs import annotate_pairs, build_pairs
from oaif.step.ranking import build_best_worst
from oaif.step.records import Collected, PairPlan, PreferenceBatch, Rollouts
from oaif.step.sampling import sample_rollouts


class Actor:
    """Sample, annotate and build pairs with a run's parts (:class:`oaif.run.build.RunParts`); ``policy``: the
    policy unwrapped (what the transformers samplers and a self-judging annotator run)."""

    def __init__(self, cfg, parts, policy):
        self.cfg, self.parts, self.policy = cfg, parts, policy

    def _whole(self, *models):
        """The block in which ``models`` (sharded: gathered whole) run forwards whose count differs between processes."""
        return gathered(*models) if self.parts.sharded else nullcontext()

    def sample(self, batch) -> Rollouts:
        """Step 1: K responses per prompt of ``batch`` from the sampler."""
        live = self.cfg.sampling.backend != "vllm"  # the transformers backends sample the policy itself
        with self._whole(self.policy) if live else nullcontext():
            return sample_rollouts(self.parts.sampler, self.parts.tokenizer, batch, self.parts.prompts.prompt_tokens,
                                   self.cfg.sampling, self.cfg.train.seed)

    def annotate(self, rollouts: Rollouts) -> tuple[PairPlan, list[Judgment]]:
        """Step 2: the annotator's preference for each pair the pairing asks about."""
        in_process = self.cfg.annotator.type in ("llm", "ensemble")  # may judge with the policy or the reference
        with self._whole(self.policy, self.parts.reference) if in_process else nullcontext():
            return annotate_pairs(self.parts.annotator, rollouts, self.cfg.sampling.pairing)

    def build_pairs(self, rollouts: Rollouts, plan: PairPlan, judgments: list[Judgment]) -> PreferenceBatch:
        """Step 3: chosen/rejected pairs; identical, tied and failed pairs masked and counted."""
        cfg, online = self.cfg, self.cfg.train.mode == "online"
        build = build_best_worst if cfg.sampling.pairing == "best_worst" and online else build_pairs
        return build(rollouts, plan, judgments, soft_labels=cfg.loss.soft_labels, min_confidence=cfg.loss.min_confidence,
                     missing_eos_penalty=cfg.loss.missing_eos_penalty if online else 0.0)

    def collect(self, batch, version: int, on_sampled: Callable[[], None] | None = None) -> Collected:
        """Steps 1-3 for one online micro-batch. ``version``: the optimizer step of the weights the sampler holds;
        ``on_sampled``: called once the responses are drawn, before the judge is asked."""
        started = time.perf_counter()
        rollouts = self.sample(batch)
        if on_sampled is not None:
            on_sampled()
        sampled = time.perf_counter()
        plan, judgments = self.annotate(rollouts)
        annotated = time.perf_counter()
        return Collected(rollouts, plan, judgments, self.build_pairs(rollouts, plan, judgments), version,
                         sampled - started, annotated - sampled)
