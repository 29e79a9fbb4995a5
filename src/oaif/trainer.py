"""The online AI feedback loop: sample, annotate, build pairs, update.

One optimizer step (:meth:`Trainer.run_step`) first collects each of its
``gradient_accumulation_steps`` micro-batches with the :class:`oaif.step.actor.Actor`:

1. ``Actor.sample``       K responses per prompt from the current policy (:mod:`oaif.step.sampling`,
   through the sampler ``sampling.backend`` names, :mod:`oaif.generation`);
2. ``Actor.annotate``     the annotator's preference for each pair (:mod:`oaif.step.pairs`);
3. ``Actor.build_pairs``  chosen/rejected pairs; identical, tied and failed pairs masked
   (``sampling.pairing=best_worst``: :func:`oaif.step.ranking.build_best_worst`, the best against the worst);

books them (:meth:`Trainer.book`: metrics, audit log), counts the step's valid pairs over every
process and runs

4. :func:`oaif.step.update.accumulate`  :class:`oaif.step.update.PolicyUpdate` on each micro-batch: policy
   and reference log-probs, the loss scaled so that the step's objective is the mean over all of the
   step's pairs, backward;

and takes the optimizer step (then a TR-DPO reference moves, :mod:`oaif.models.reference`). The
policy does not change while a step collects, so collecting first changes no sample. Once the step is
complete, the sampler gets the new weights (a vLLM engine or server; the transformers backends sample
the policy itself). Offline mode replaces steps 1-2 with pairs read from a preference file. With
``train.async_steps`` >= 1 a background worker (:mod:`oaif.run.async_collect`) runs the actor on the
next steps' prompts and pushes the weights while the main thread updates; the main thread still draws
the prompts and keeps the books.

Setup lives in :mod:`oaif.run.build`, metric bookkeeping in :class:`oaif.run.metrics.StepMetrics`, the
audit log in :mod:`oaif.run.audit`, checkpoints and resume in :mod:`oaif.run.saving`, and the run around
the steps (progress, saves, stops) in :mod:`oaif.run.loop`. Under ``train.fsdp``
(:mod:`oaif.models.sharding`) checkpoints, the optimizer state and the weight push read the weights
gathered one tensor at a time, on every process together.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from oaif.annotators.ensemble import AgreementTally
from oaif.config import Config
from oaif.generation.weights import policy_weights
from oaif.models.sharding import plain
from oaif.run.async_collect import AsyncCollector
from oaif.run.judge_noise import NoiseWindow
from oaif.run.metrics import FailureWindow, StepMetrics
from oaif.step.actor import Actor
from oaif.step.pairs import preference_rollouts
from oaif.step.records import Collected, PreferenceBatch, Rollouts
from oaif.step.update import accumulate


@dataclass
class MicroBatch:
    rollouts: Rollouts
    prefs: PreferenceBatch


def global_sum(accelerator, n: int) -> int:
    """``n`` summed over every process."""
    t = torch.tensor([n], device=accelerator.device, dtype=torch.long)
    return int(accelerator.reduce(t, reduction="sum").item())


class Trainer:
    """Owns one run's parts (:class:`oaif.run.build.RunParts`) and its progress. ``train()`` runs it.
    ``annotator`` and ``sampler`` (a Generator) replace the configured ones; a sampler given here is not closed."""

    def __init__(self, cfg: Config, *, annotator=None, sampler=None):
        self.cfg, self._annotator_override, self._sampler_override = cfg, annotator, sampler
        self.step = 0
        self.failures = FailureWindow(cfg.annotator.failure_window)
        self.judge_noise = NoiseWindow(cfg.annotator.noise_window if cfg.train.mode == "online" else 0)
        self.agreement = AgreementTally()  # an ensemble's members against its verdicts, over the judgments trained on

    def setup(self) -> "Trainer":
        from oaif.models.reference import training_reference
        from oaif.run.checkpoint import RunCheckpoints
        from oaif.run.build import build_run, claim_run_dir, open_run_dir
        from oaif.run.saving import restore
        from oaif.step.update import PolicyUpdate

        cfg = self.cfg
        self.parts = parts = build_run(cfg, self._annotator_override, self._sampler_override)
        self.accelerator, self.policy, self.tokenizer = parts.accelerator, parts.policy, parts.tokenizer
        self.optimizer, self.scheduler, self.stream, self.annotator, self.sampler = (
            parts.optimizer, parts.scheduler, parts.stream, parts.annotator, parts.sampler)
        reference, self.moving_reference = training_reference(cfg.loss, self.unwrapped, parts.reference)
        self.update = PolicyUpdate(self.accelerator, self.policy, reference, self.tokenizer.pad_token_id,
                                   cfg.loss, kl=cfg.train.mode == "online", forward_batch_size=cfg.train.forward_batch_size,
                                   share_prompts=cfg.train.share_prompt_forward)
        self.actor = Actor(cfg, parts, self.unwrapped)  # steps 1-3 (the async worker runs them too)
        self.checkpoints = RunCheckpoints(self.accelerator, cfg.train.output_dir, cfg.train.keep_last,
                                          reference=self.moving_reference)
        if cfg.train.resume:  # weights, optimizer, schedule, stream and failure window as saved
            self.step = restore(self)
        self.lock = claim_run_dir(cfg, self.accelerator)  # everything that can fail has been built
        self.push_weights()  # the sampler starts from the policy as it is now (resumed, or whatever a server held)
        self.committed_stream = self.stream.state_dict()  # the stream as of the last finished step
        self.ahead = None
        self.sampler_shares_device = cfg.sampling.backend != "vllm" or cfg.vllm.mode == "colocated"
        if cfg.train.async_steps and cfg.train.mode == "online":  # the worker; a checkpoint's queued steps back in it
            self.ahead = AsyncCollector(cfg.train.async_steps, self.actor.collect, self.sampler.load_weights,
                                        version=self.step)
            self.ahead.restore(self.checkpoints.restored.get("async"), self.accelerator, self.stream)
        self.metrics, self.audit = open_run_dir(cfg, self.is_main, self.step if cfg.train.resume else None)
        return self

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.policy)

    # -- steps 1-3 -------------------------------------------------------------------------
    def next_prompts(self) -> list:
        a = self.accelerator
        return self.stream.take_for_rank(self.cfg.train.batch_size * a.num_processes, a.process_index, a.num_processes)

    def book(self, c: Collected, metrics: StepMetrics) -> MicroBatch:
        """A collected micro-batch into this step's audit log and metrics (the main thread)."""
        metrics.add("time_sample_s", c.time_sample_s)
        metrics.add("time_annotate_s", c.time_annotate_s)
        self.audit.add(self.step + 1, c.rollouts, c.plan, c.judgments, c.version)
        metrics.add_micro_batch(c.rollouts, c.plan, c.prefs, c.judgments)
        self.agreement.add(c.judgments)
        return MicroBatch(c.rollouts, c.prefs)

    def collect(self, batch, metrics: StepMetrics) -> MicroBatch:
        """Steps 1-3 for one micro-batch: sample, annotate, build pairs (offline: a preference file's pairs)."""
        if self.cfg.train.mode == "online":
            return self.book(self.actor.collect(batch, self.step), metrics)
        tokenize = lambda text: self.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        fp = preference_rollouts(batch, self.parts.prompts.prompt_tokens, tokenize, self.parts.end_of_turn,
                                 self.cfg.sampling.max_new_tokens)
        prefs = self.actor.build_pairs(fp.rollouts, fp.plan, fp.labels)
        metrics.add_micro_batch(fp.rollouts, fp.plan, prefs, None, fp.truncated)
        return MicroBatch(fp.rollouts, prefs)

    def collect_ahead(self, metrics: StepMetrics) -> tuple[list[MicroBatch], int, float]:
        """``train.async_steps``: queue the next steps' prompts (drawn here, in stream order), then take this
        step's micro-batches from the worker; ``(micro-batches, policy_lag, seconds waited)``."""
        n = self.cfg.train.gradient_accumulation_steps
        collected, waited = self.ahead.take(lambda: [self.next_prompts() for _ in range(n)], self.stream.state_dict,
                                            self.cfg.train.max_steps - self.step)
        return [self.book(c, metrics) for c in collected], self.step - collected[0].version, waited

    # -- one optimizer step ----------------------------------------------------------------
    def run_step(self) -> dict:
        """Collect every micro-batch (steps 1-3), then update on each (step 4) and take the optimizer step."""
        started, metrics, lag, waited = time.perf_counter(), StepMetrics(), 0, 0.0
        if self.ahead is None:
            micro_batches = [self.collect(self.next_prompts(), metrics)
                             for _ in range(self.cfg.train.gradient_accumulation_steps)]
        else:
            micro_batches, lag, waited = self.collect_ahead(metrics)
            if self.sampler_shares_device:  # sample the next batch first: the update then overlaps the judge
                waited += self.ahead.wait_sampled()
        global_pairs = global_sum(self.accelerator, sum(mb.prefs.size for mb in micro_batches))
        accumulate(self.update, micro_batches, global_pairs, metrics)  # step 4 on each micro-batch
        grad_norm = None
        if global_pairs > 0 and self.cfg.optim.max_grad_norm > 0:
            grad_norm = float(plain(self.accelerator.clip_grad_norm_(self.policy.parameters(),
                                                                     self.cfg.optim.max_grad_norm)))
        if self.ahead is not None:  # the worker's last push reads the weights the optimizer is about to change
            pushed, push_wait = self.ahead.wait_push()
        self.optimizer.step()  # without any pair no parameter has a gradient: the step leaves all alone
        self.optimizer.zero_grad(set_to_none=True)
        if self.moving_reference is not None:  # TR-DPO: after the step, every process alike
            self.moving_reference.after_step(self.unwrapped, self.step + 1)
        record = self._end_step(metrics, grad_norm, started)
        record["policy_lag"] = lag
        if self.ahead is None:
            record["time_weight_sync_s"] = self.push_weights()  # after the step is complete: a failed push loses nothing
            return record
        # listed here (LoRA merged now, not while a reference forward switches the adapter off), loaded by the worker
        # behind the steps being collected; a failure shows at the next step
        self.ahead.push(self.step, list(policy_weights(self.unwrapped)))
        if self.step >= self.cfg.train.max_steps:  # the last step: the sampler ends with the final weights, as in sync
            pushed, last_wait = self.ahead.wait_push()
            push_wait += last_wait
        return record | {"time_weight_sync_s": pushed, "time_wait_s": waited + push_wait}

    def push_weights(self) -> float:
        """Give the sampler the policy's current weights (vLLM; nothing to do for the transformers backends); seconds."""
        started = time.perf_counter()
        if self.sampler is not None:  # sharded: gathered one tensor at a time on every process (vLLM)
            self.sampler.load_weights(policy_weights(self.unwrapped))
        return time.perf_counter() - started

    def _end_step(self, metrics: StepMetrics, grad_norm: float | None, started: float) -> dict:
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.step += 1
        now = self.stream.state_dict()
        self.committed_stream = now if self.ahead is None else self.ahead.committed_stream(now)
        totals = metrics.reduce(self.accelerator)
        self.audit.flush(self.accelerator)
        self.failures.add(totals)
        self.judge_noise.add(totals)  # every process holds the same sums; the main process speaks (run.loop)
        record = {"step": self.step, "lr": lr, **totals.record(self.accelerator.num_processes),
                  "time_step_s": time.perf_counter() - started, "prompts_seen": self.committed_stream["position"]}
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        return record | {f"judge_agreement/{name}": v for name, v in self.agreement.values().items()}

    def close(self) -> None:
        """Stop the async worker; release the run directory and close the logs and the sampler (one this trainer built)."""
        if self.ahead is not None:
            self.ahead.close()
        self.lock.release()
        if self.metrics is not None:
            self.metrics.close()
        self.audit.close()
        if self.sampler is not None and self._sampler_override is None:
            self.sampler.close()

    def train(self) -> dict:
        """Run steps until ``train.max_steps`` (:func:`oaif.run.loop.run_steps`) and return a summary."""
        from oaif.run.loop import run_steps

        return run_steps(self)


def train(cfg: Config, *, annotator=None) -> dict:
    """Set up and run a training job from a config. Returns a summary."""
    return Trainer(cfg, annotator=annotator).setup().train()
