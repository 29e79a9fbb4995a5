"""The online AI feedback loop: sample, annotate, build pairs, update.

One optimizer step (:meth:`Trainer.run_step`) first collects each of its
``gradient_accumulation_steps`` micro-batches:

1. :meth:`Trainer.sample`   K responses per prompt from the current policy (:mod:`oaif.sampling`);
2. :meth:`Trainer.annotate` the annotator's preference for each pair (:mod:`oaif.pairs`);
3. :func:`oaif.pairs.build_pairs`  chosen/rejected pairs; identical, tied and failed pairs masked;

then counts the step's valid pairs over every process and runs

4. :class:`oaif.update.PolicyUpdate`  on each micro-batch: policy and reference log-probs, the loss
   scaled so that the step's objective is the mean over all of the step's pairs, backward;

and takes the optimizer step. The policy does not change while a step collects, so collecting
first changes no sample. Offline mode replaces steps 1-2 with pairs read from a preference file.
Setup lives in :mod:`oaif.run_setup`, metric bookkeeping in :class:`oaif.metrics.StepMetrics`,
the audit log in :mod:`oaif.audit`, checkpoint state in :mod:`oaif.checkpoint`.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from oaif.annotators.base import Judgment
from oaif.config import Config, dump_yaml
from oaif.errors import AnnotatorError
from oaif.metrics import FailureWindow, MetricsWriter, StepMetrics
from oaif.pairs import PairPlan, PreferenceBatch, build_pairs, pair_requests, preference_rollouts
from oaif.sampling import Rollouts, sample_responses

log = logging.getLogger("oaif")


@dataclass
class MicroBatch:
    rollouts: Rollouts
    prefs: PreferenceBatch


class Trainer:
    """Owns one run's parts (:class:`oaif.run_setup.RunParts`) and its progress. ``train()`` runs it."""

    def __init__(self, cfg: Config, *, annotator=None):
        self.cfg, self._annotator_override = cfg, annotator
        self.out = Path(cfg.train.output_dir)
        self.step, self._last_saved = 0, -1
        self.failures = FailureWindow(cfg.annotator.failure_window)

    def setup(self) -> "Trainer":
        from oaif.run_setup import build_run
        from oaif.update import PolicyUpdate

        cfg = self.cfg
        self.parts = parts = build_run(cfg, self._annotator_override)
        self.accelerator, self.policy, self.tokenizer = parts.accelerator, parts.policy, parts.tokenizer
        self.optimizer, self.scheduler, self.stream, self.annotator = (parts.optimizer, parts.scheduler, parts.stream,
                                                                        parts.annotator)
        self.update = PolicyUpdate(self.accelerator, self.policy, parts.reference, self.tokenizer.pad_token_id,
                                   cfg.loss, kl=cfg.train.mode == "online")
        self._committed_stream = self.stream.state_dict()
        if cfg.train.resume:
            self._restore()
        self._open_run_dir(resume_step=self.step if cfg.train.resume else None)
        return self

    def _open_run_dir(self, resume_step: int | None) -> None:
        """The one place the run directory is written before training: config, metrics and audit logs."""
        from oaif.audit import AuditLog

        cfg = self.cfg
        self.metrics = None
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(dump_yaml(cfg))
            self.metrics = MetricsWriter(self.out / "metrics.jsonl", cfg.logging.report_to,
                                         cfg.logging.run_name or self.out.name, cfg.to_dict(), resume_step=resume_step)
        audit = cfg.annotator.audit_log and cfg.train.mode == "online"
        self.audit = AuditLog(self.out / "annotations.jsonl" if audit else None, is_main=self.is_main,
                              resume_step=resume_step)

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

    def sample(self, batch) -> Rollouts:
        cfg, tokens = self.cfg.sampling, self.parts.prompts.prompt_tokens
        records = [rec for _, rec in batch]
        prompt_tokens = [tokens[r.id] for r in records]
        responses, ended = sample_responses(self.unwrapped, self.tokenizer, prompt_tokens, [pos for pos, _ in batch],
                                            k=cfg.num_samples, seed=self.cfg.train.seed, temperature=cfg.temperature,
                                            top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, backend=cfg.backend,
                                            batch_size=cfg.batch_size)
        texts = [[self.tokenizer.decode(r, skip_special_tokens=True).strip() for r in rs] for rs in responses]
        return Rollouts(positions=[pos for pos, _ in batch], prompt_ids=[r.id for r in records],
                        prompt_texts=[r.text for r in records], prompt_tokens=prompt_tokens,
                        responses=responses, texts=texts, ended_eos=ended)

    def annotate(self, rollouts: Rollouts) -> tuple[PairPlan, list[Judgment]]:
        plan = pair_requests(rollouts, self.cfg.sampling.pairing)
        judgments = self.annotator.annotate(plan.requests) if plan.requests else []
        if len(judgments) != len(plan.requests):
            raise AnnotatorError(f"annotator {getattr(self.annotator, 'name', '?')} returned {len(judgments)} "
                                 f"judgments for {len(plan.requests)} pairs")
        return plan, judgments

    def collect(self, batch, metrics: StepMetrics) -> MicroBatch:
        """Steps 1-3 for one micro-batch: sample, annotate, build pairs (offline: a preference file's pairs)."""
        cfg, truncated = self.cfg, 0
        if cfg.train.mode == "offline":
            tokenize = lambda text: self.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
            fp = preference_rollouts(batch, self.parts.prompts.prompt_tokens, tokenize, self.parts.end_of_turn,
                                     cfg.sampling.max_new_tokens)
            rollouts, plan, judgments, truncated = fp.rollouts, fp.plan, fp.labels, fp.truncated
        else:
            with metrics.timed("sample"):
                rollouts = self.sample(batch)
            with metrics.timed("annotate"):
                plan, judgments = self.annotate(rollouts)
            self.audit.add(self.step + 1, rollouts, plan, judgments)
        prefs = build_pairs(rollouts, plan, judgments, soft_labels=cfg.loss.soft_labels,
                            min_confidence=cfg.loss.min_confidence,
                            missing_eos_penalty=cfg.loss.missing_eos_penalty if cfg.train.mode == "online" else 0.0)
        metrics.add_micro_batch(rollouts, plan, prefs, judgments if cfg.train.mode == "online" else None, truncated)
        return MicroBatch(rollouts, prefs)

    # -- one optimizer step ----------------------------------------------------------------
    def run_step(self) -> dict:
        """Collect every micro-batch (steps 1-3), then update on each (step 4) and take the optimizer step."""
        started, metrics = time.perf_counter(), StepMetrics()
        micro_batches = [self.collect(self.next_prompts(), metrics)
                         for _ in range(self.cfg.train.gradient_accumulation_steps)]
        global_pairs = self._global_sum(sum(mb.prefs.size for mb in micro_batches))
        several = self.accelerator.num_processes > 1
        for i, mb in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            # DDP all-reduces gradients in the last micro-batch's backward: every process must run one
            with metrics.timed("update"), nullcontext() if last or not several else self.accelerator.no_sync(self.policy):
                metrics.add_update(self.update(mb.rollouts, mb.prefs, global_pairs,
                                               must_backward=last and several and global_pairs > 0))
        grad_norm = None
        if global_pairs > 0 and self.cfg.optim.max_grad_norm > 0:
            grad_norm = float(self.accelerator.clip_grad_norm_(self.policy.parameters(), self.cfg.optim.max_grad_norm))
        self.optimizer.step()  # without any pair no parameter has a gradient: the step leaves all alone
        self.optimizer.zero_grad(set_to_none=True)
        return self._end_step(metrics, grad_norm, started)

    def _global_sum(self, n: int) -> int:
        if self.accelerator.num_processes == 1:
            return n
        t = torch.tensor([n], device=self.accelerator.device, dtype=torch.long)
        return int(self.accelerator.reduce(t, reduction="sum").item())

    def _end_step(self, metrics: StepMetrics, grad_norm: float | None, started: float) -> dict:
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.step += 1
        self._committed_stream = self.stream.state_dict()
        totals = metrics.reduce(self.accelerator)
        self.audit.flush(self.accelerator)
        self.failures.add(totals)
        record = {"step": self.step, "lr": lr, **totals.record(self.accelerator.num_processes),
                  "time_step_s": time.perf_counter() - started, "prompts_seen": self.stream.position}
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        agreement = getattr(self.annotator, "agreement", None)
        if callable(agreement):  # an ensemble: how often each member agrees with the ensemble (this process)
            record.update({f"judge_agreement/{name}": value for name, value in agreement().items()})
        return record

    # -- checkpoints -----------------------------------------------------------------------
    def save(self, *, collective: bool = True) -> Path:
        """Write ``checkpoint-<step>`` from the main process. ``collective=False``: no barriers (error path)."""
        from oaif.checkpoint import save_checkpoint, trainer_state

        if collective:
            self.accelerator.wait_for_everyone()
        path = self.out / f"checkpoint-{self.step}"
        if self.is_main:
            # the stream as of the last finished step: an interrupted step's prompts are drawn again
            state = trainer_state(self.step, self._committed_stream, self.optimizer, self.scheduler, self.failures,
                                  self.cfg.to_dict())
            path = save_checkpoint(self.out, self.step, self.unwrapped, self.tokenizer, state,
                                   keep_last=self.cfg.train.keep_last)
        self._last_saved = self.step
        if collective:
            self.accelerator.wait_for_everyone()
        return path

    def _restore(self) -> None:
        from oaif.checkpoint import latest_checkpoint, restore_trainer_state

        resume = self.cfg.train.resume
        ckpt = Path(resume) if isinstance(resume, str) else latest_checkpoint(self.out)
        if ckpt is None:
            log.warning("train.resume=true but %s has no checkpoint: starting from step 0", self.out)
            return
        self.step = self._last_saved = restore_trainer_state(ckpt, self.unwrapped, self.optimizer, self.scheduler,
                                                             self.stream, self.failures)
        self._committed_stream = self.stream.state_dict()
        log.info("resumed from %s at step %d", ckpt, self.step)

    def _check_failures(self) -> None:
        rate, limit = self.failures.rate(), self.cfg.annotator.max_failure_rate
        if rate is not None and rate > limit:
            path = self.save()
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.failures.reasons.items()))
            raise AnnotatorError(
                f"the annotator failed on {rate:.0%} of the last {len(self.failures.window)} pairs (over "
                f"annotator.max_failure_rate={limit}; reasons so far: {reasons}); saved {path}, "
                f"fix the annotator and rerun with train.resume=true")

    def _save_after_error(self, error: BaseException) -> None:
        """Keep the progress since the last checkpoint. With several processes only the main one saves,
        without barriers: the others may be stuck in (or gone from) a collective call."""
        if self.step <= max(0, self._last_saved) or not (self.is_main or self.accelerator.num_processes == 1):
            return
        try:
            path = self.save(collective=self.accelerator.num_processes == 1)
            log.error("stopped at step %d (%s); progress saved in %s, rerun with train.resume=true",
                      self.step, type(error).__name__, path)
        except Exception:  # pragma: no cover - the original error matters more
            log.exception("could not save a checkpoint after the error")

    # -- the run ---------------------------------------------------------------------------
    def train(self) -> dict:
        from tqdm.auto import tqdm

        cfg = self.cfg
        bar = tqdm(total=cfg.train.max_steps, initial=self.step, desc=f"oaif {cfg.train.mode} {cfg.loss.type}",
                   disable=not (self.is_main and cfg.logging.progress_bar), dynamic_ncols=True)
        last: dict = {}
        try:
            while self.step < cfg.train.max_steps:
                last = self.run_step()
                if self.is_main:
                    self.metrics.write(last)
                    bar.set_postfix({k: f"{last[k]:.3g}" for k in ("loss", "reward_accuracy", "kl", "response_length",
                                                                    "judge_consistency") if k in last}
                                    | {"pairs": last["pairs_used"]})
                    bar.update(1)
                self._check_failures()
                if cfg.train.save_every and self.step % cfg.train.save_every == 0 and self.step < cfg.train.max_steps:
                    self.save()
            final = self.save()
        except (KeyboardInterrupt, Exception) as e:
            if not isinstance(e, AnnotatorError):
                self._save_after_error(e)
            raise
        finally:
            bar.close()
            if self.metrics is not None:
                self.metrics.close()
            self.audit.close()
        return {"final_checkpoint": str(final), "steps": self.step, "last": last,
                "skipped_inputs": dict(self.parts.prompts.skipped)}


def train(cfg: Config, *, annotator=None) -> dict:
    """Set up and run a training job from a config. Returns a summary."""
    return Trainer(cfg, annotator=annotator).setup().train()
