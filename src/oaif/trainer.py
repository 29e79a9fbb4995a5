"""The online AI feedback loop: sample, annotate, build pairs, update.

Each optimizer step runs ``gradient_accumulation_steps`` micro-batches. A micro-batch is

1. :meth:`Trainer.sample`   K responses per prompt from the current policy (:mod:`oaif.sampling`);
2. :meth:`Trainer.annotate` the annotator's preference for each pair (:mod:`oaif.pairs`);
3. :func:`oaif.pairs.build_pairs`  chosen/rejected pairs; identical, tied and failed pairs masked;
4. :meth:`Trainer.update`   policy and reference log-probs of the responses (one forward for all
   chosen and rejected responses together; the reference under ``no_grad``), the loss, backward.

Offline mode replaces steps 1-2 with pairs read from a preference file and goes through the same
3-4. Across processes, the loss is normalised by the *global* number of valid pairs, so a run on
N processes takes the same step as one process with the same global batch.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter, deque
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from oaif.annotators.base import Judgment
from oaif.config import Config, dump_yaml
from oaif.errors import AnnotatorError, DataError
from oaif.logprobs import pack_sequences, sequence_logprobs
from oaif.losses import preference_loss
from oaif.metrics import MetricsWriter, Sums
from oaif.pairs import PairPlan, PreferenceBatch, build_pairs, pair_requests
from oaif.sampling import Rollouts, sample_responses

log = logging.getLogger("oaif")


@dataclass
class UpdateResult:
    loss: torch.Tensor | None  # scaled loss that was back-propagated (None: nothing to learn from)
    pairs: int
    tokens: int


def make_scheduler(optimizer, name: str, warmup: int, total: int):
    def factor(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if name == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if name == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def preference_rollouts(records, tokenizer, encode, positions: list[int]) -> tuple[Rollouts, PairPlan, list[Judgment]]:
    """Offline mode: a preference file's pairs as K=2 rollouts plus the file's labels as judgments."""
    eos = tokenizer.eos_token_id
    prompt_tokens, responses, texts = [], [], []
    judgments = []
    plan = PairPlan(pairs=[], requests=[])
    for b, rec in enumerate(records):
        prompt_tokens.append(encode(rec.prompt))
        pair = [tokenizer(t, add_special_tokens=False)["input_ids"] + [eos] for t in (rec.chosen, rec.rejected)]
        responses.append(pair)
        texts.append([rec.chosen, rec.rejected])
        plan.pairs.append((b, 0, 1))
        judgments.append(Judgment(prob=1.0 if rec.prob is None else float(rec.prob), judge="preference_file"))
    roll = Rollouts(positions=positions, prompt_ids=[r.id for r in records],
                    prompt_texts=[r.text for r in records], prompt_tokens=prompt_tokens,
                    responses=responses, texts=texts, ended_eos=[[True, True] for _ in records])
    return roll, plan, judgments


def preflight(cfg: Config) -> None:
    """Fail fast, before any model loads, on inputs that can be checked cheaply."""
    path = cfg.data.path if cfg.train.mode == "online" else cfg.data.preference_path
    if not Path(path).exists():
        kind = "prompt" if cfg.train.mode == "online" else "preference"
        raise DataError(f"{kind} file not found: {path} (data.{'path' if kind == 'prompt' else 'preference_path'})")
    if cfg.train.mode == "online" and cfg.annotator.type in ("llm", "openai"):
        from oaif.annotators.rubrics import load_rubric

        load_rubric(cfg.annotator.rubric)
    if cfg.train.mode == "online" and cfg.annotator.type == "callable":
        from oaif.annotators.callable_judge import resolve_callable

        resolve_callable(cfg.annotator.callable)


class Trainer:
    """Owns the models, data, annotator and optimizer of one run. ``train()`` runs it."""

    def __init__(self, cfg: Config, *, annotator=None):
        self.cfg = cfg
        self._annotator_override = annotator
        self.out = Path(cfg.train.output_dir)
        self.step = 0
        self.failure_window: deque[bool] = deque(maxlen=cfg.annotator.failure_window)
        self.totals: Counter = Counter()
        self._last_saved = -1

    # -- setup ---------------------------------------------------------------------------
    def setup(self) -> "Trainer":
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        from oaif import data as data_mod
        from oaif import models

        cfg = self.cfg
        preflight(cfg)
        self.accelerator = Accelerator(cpu=cfg.train.device == "cpu", mixed_precision=cfg.train.mixed_precision)
        if cfg.train.device == "cuda" and self.accelerator.device.type != "cuda":
            raise DataError("train.device=cuda but no CUDA device is available")
        set_seed(cfg.train.seed)
        self.policy, self.reference, self.tokenizer = models.load_policy_and_reference(cfg.model)
        self.encode = lambda prompt: models.encode_prompt(self.tokenizer, prompt, cfg.model.chat_template,
                                                          cfg.model.system_prompt)
        self.skipped: Counter = Counter()
        if cfg.train.mode == "online":
            prompt_set = data_mod.load_prompts(cfg.data.path, cfg.data.format, cfg.data.field)
            self.skipped.update(prompt_set.skipped)
            self._prompt_tokens: dict[str, list[int]] = {}
            kept = []
            for rec in prompt_set.records:
                toks = self.encode(rec.prompt)
                if len(toks) > cfg.data.max_prompt_tokens:
                    self.skipped["too_long"] += 1
                    continue
                self._prompt_tokens[rec.id] = toks
                kept.append(rec)
            if cfg.data.eval_path:
                self.eval_prompts = data_mod.load_prompts(cfg.data.eval_path, cfg.data.format, cfg.data.field).records
                train_records = kept
            else:
                train_records, self.eval_prompts = data_mod.split_eval(kept, cfg.data.eval_fraction, cfg.train.seed)
            records = train_records
        else:
            pref_set = data_mod.load_preferences(cfg.data.preference_path)
            self.skipped.update(pref_set.skipped)
            records = pref_set.records
            self.eval_prompts = []
        if not records:
            raise DataError(f"no usable records in {cfg.data.path if cfg.train.mode == 'online' else cfg.data.preference_path}"
                            f" (skipped: {dict(self.skipped) or 'none'})")
        if self.skipped:
            log.warning("skipped input rows: %s", dict(self.skipped))
        self.stream = data_mod.PromptStream(records, seed=cfg.train.seed, shuffle=cfg.data.shuffle)
        self._committed_stream = self.stream.state_dict()

        params = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                                           weight_decay=cfg.optim.weight_decay)
        self.scheduler = make_scheduler(self.optimizer, cfg.optim.scheduler, cfg.optim.warmup_steps, cfg.train.max_steps)
        self.policy, self.optimizer = self.accelerator.prepare(self.policy, self.optimizer)
        if self.reference is not None:
            self.reference.to(self.accelerator.device)
        if cfg.train.mode == "online":
            if self._annotator_override is not None:
                self.annotator = self._annotator_override
            else:
                from oaif.annotators.build import build_annotator

                self.annotator = build_annotator(cfg.annotator, policy_path=cfg.model.name_or_path,
                                                 reference=self.reference, tokenizer=self.tokenizer,
                                                 cache_dir=cfg.model.cache_dir, device=self.accelerator.device)
        else:
            self.annotator = None
        if cfg.train.resume:
            self._resume()
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(dump_yaml(cfg))
        self.metrics = MetricsWriter(self.out / "metrics.jsonl", cfg.logging.report_to if self.is_main else [],
                                     cfg.logging.run_name or self.out.name, cfg.to_dict(),
                                     resume_step=self.step if cfg.train.resume else None) if self.is_main else None
        self.audit = open(self.out / "annotations.jsonl", "a" if cfg.train.resume else "w", buffering=1) \
            if self.is_main and cfg.annotator.audit_log and cfg.train.mode == "online" else None
        return self

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.policy)

    def reference_model(self):
        from oaif.models import reference_context

        return reference_context(self.unwrapped, self.reference)

    # -- the four steps --------------------------------------------------------------------
    def next_prompts(self):
        a, cfg = self.accelerator, self.cfg
        return self.stream.take_for_rank(cfg.train.batch_size * a.num_processes, a.process_index, a.num_processes)

    def sample(self, batch) -> Rollouts:
        cfg = self.cfg.sampling
        positions = [pos for pos, _ in batch]
        records = [rec for _, rec in batch]
        prompt_tokens = [self._prompt_tokens[r.id] for r in records]
        responses, ended = sample_responses(self.unwrapped, self.tokenizer, prompt_tokens, positions,
                                            k=cfg.num_samples, seed=self.cfg.train.seed, temperature=cfg.temperature,
                                            top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, backend=cfg.backend,
                                            batch_size=cfg.batch_size)
        texts = [[self.tokenizer.decode(r, skip_special_tokens=True).strip() for r in rs] for rs in responses]
        return Rollouts(positions=positions, prompt_ids=[r.id for r in records],
                        prompt_texts=[r.text for r in records], prompt_tokens=prompt_tokens,
                        responses=responses, texts=texts, ended_eos=ended)

    def annotate(self, rollouts: Rollouts) -> tuple[PairPlan, list[Judgment]]:
        plan = pair_requests(rollouts, self.cfg.sampling.pairing)
        judgments = self.annotator.annotate(plan.requests) if plan.requests else []
        if len(judgments) != len(plan.requests):
            raise AnnotatorError(f"annotator {getattr(self.annotator, 'name', '?')} returned {len(judgments)} "
                                 f"judgments for {len(plan.requests)} pairs")
        return plan, judgments

    def update(self, rollouts: Rollouts, prefs: PreferenceBatch, global_pairs: int, scale: float, sums: Sums) -> UpdateResult:
        """Forward the responses in ``prefs`` under policy and reference, and back-propagate the loss."""
        cfg = self.cfg
        used = prefs.responses_used()
        if not used:  # this rank has nothing, but DDP needs every rank to take part in the backward
            if global_pairs == 0:
                return UpdateResult(None, 0, 0)
            used = [0]
        index = {flat: i for i, flat in enumerate(used)}
        k = rollouts.k
        prompts = [rollouts.prompt_tokens[f // k] for f in used]
        responses = [rollouts.responses[f // k][f % k] for f in used]
        batch = pack_sequences(prompts, responses, self.tokenizer.pad_token_id).to(self.accelerator.device)
        policy_logps, policy_tok = sequence_logprobs(self.policy, batch)
        with torch.no_grad(), self.reference_model() as ref:
            ref_logps, ref_tok = sequence_logprobs(ref, batch)
        if prefs.size == 0:
            loss = policy_logps.sum() * 0.0
        else:
            c = torch.tensor([index[i] for i in prefs.chosen], device=policy_logps.device)
            r = torch.tensor([index[i] for i in prefs.rejected], device=policy_logps.device)
            labels = torch.tensor(prefs.label_probs, device=policy_logps.device) if cfg.loss.soft_labels else None
            out = preference_loss(policy_logps[c], policy_logps[r], ref_logps[c], ref_logps[r], cfg.loss.beta,
                                  cfg.loss.type, labels)
            # DDP averages gradients over processes: scale so the result is the global mean over pairs
            loss = out.losses.sum() * (self.accelerator.num_processes / global_pairs) * scale
            sums.add("loss", out.losses.detach().sum().item(), prefs.size)
            sums.add("margin", out.margins.sum().item(), prefs.size)
            sums.add("reward_accuracy", (out.margins > 0).float().sum().item(), prefs.size)
            sums.add("rewards/chosen", out.chosen_rewards.sum().item(), prefs.size)
            sums.add("rewards/rejected", out.rejected_rewards.sum().item(), prefs.size)
            if cfg.train.mode == "online":
                kl = (policy_tok.detach() - ref_tok).sum(-1)  # padding is zero in both
                sums.add("kl", kl.sum().item(), len(used))
        self.accelerator.backward(loss)
        return UpdateResult(loss.detach(), prefs.size, int(batch.response_mask.sum()))

    # -- one optimizer step ---------------------------------------------------------------
    def _global_count(self, n: int) -> int:
        if self.accelerator.num_processes == 1:
            return n
        t = torch.tensor([n], device=self.accelerator.device, dtype=torch.long)
        return int(self.accelerator.reduce(t, reduction="sum").item())

    def run_step(self) -> dict:
        cfg = self.cfg
        accum = cfg.train.gradient_accumulation_steps
        sums = Sums()
        t_step = time.perf_counter()
        for micro in range(accum):
            batch = self.next_prompts()
            t0 = time.perf_counter()
            if cfg.train.mode == "online":
                rollouts = self.sample(batch)
                t1 = time.perf_counter()
                plan, judgments = self.annotate(rollouts)
                t2 = time.perf_counter()
                lengths = [len(r) for rs in rollouts.responses for r in rs]
                sums.add("response_length", sum(lengths), len(lengths))
                sums.add("response_chars", sum(len(t) for ts in rollouts.texts for t in ts), len(lengths))
                sums.add("eos_rate", sum(e for es in rollouts.ended_eos for e in es), len(lengths))
                sums.add("generated_tokens", sum(lengths), 1)
                self._audit(rollouts, plan, judgments)
            else:
                rollouts, plan, judgments = preference_rollouts([rec for _, rec in batch], self.tokenizer, self.encode,
                                                                [pos for pos, _ in batch])
                t1 = t2 = time.perf_counter()
            prefs = build_pairs(rollouts, plan, judgments, soft_labels=cfg.loss.soft_labels,
                                min_confidence=cfg.loss.min_confidence)
            for j in judgments:
                if j.ok:
                    sums.add("judge_confidence", max(j.prob, 1 - j.prob), 1)
                    if j.consistent is not None:
                        sums.add("judge_consistency", float(j.consistent), 1)
                    if "label_mass" in j.extra:
                        sums.add("judge_label_mass", j.extra["label_mass"], 1)
            sums.add("pairs_judged", len(judgments), 1)
            sums.add("pairs_used", prefs.size, 1)
            sums.add("pairs_masked", sum(prefs.masked.values()), 1)
            sums.add("pairs_failed", sum(prefs.failed.values()), 1)
            for reason in ("identical", "tie"):
                sums.add(f"masked/{reason}", prefs.masked.get(reason, 0), 1)
            self.totals.update({f"failed/{k}": v for k, v in prefs.failed.items()})
            global_pairs = self._global_count(prefs.size)
            sync = micro == accum - 1
            ctx = nullcontext() if sync or self.accelerator.num_processes == 1 else self.accelerator.no_sync(self.policy)
            with ctx:
                result = self.update(rollouts, prefs, global_pairs, 1.0 / accum, sums)
            t3 = time.perf_counter()
            sums.add("time_sample_s", t1 - t0, 1)
            sums.add("time_annotate_s", t2 - t1, 1)
            sums.add("time_update_s", t3 - t2, 1)
            sums.add("train_tokens", result.tokens, 1)
        grad_norm = None
        if cfg.optim.max_grad_norm > 0 and (sums.total("pairs_used") > 0 or self.accelerator.num_processes > 1):
            grad_norm = float(self.accelerator.clip_grad_norm_(self.policy.parameters(), cfg.optim.max_grad_norm))
        self.optimizer.step()  # parameters without a gradient (nothing to learn this step) are left alone
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.step += 1
        self._committed_stream = self.stream.state_dict()
        g = sums.reduce(self.accelerator)
        record = self._record(g, lr, grad_norm, time.perf_counter() - t_step)
        failed_total = int(g.total("pairs_failed"))
        judged = int(g.total("pairs_judged"))
        self.failure_window.extend([True] * failed_total + [False] * (judged - failed_total))
        return record

    def _record(self, g: Sums, lr: float, grad_norm, step_time: float) -> dict:
        rec: dict = {"step": self.step, "lr": lr}
        for name in ("loss", "margin", "reward_accuracy", "rewards/chosen", "rewards/rejected", "kl",
                     "response_length", "response_chars", "eos_rate", "judge_confidence", "judge_consistency",
                     "judge_label_mass"):
            value = g.mean(name)
            if value is not None:
                rec[name] = value
        if grad_norm is not None:
            rec["grad_norm"] = grad_norm
        for name in ("pairs_judged", "pairs_used", "pairs_masked", "pairs_failed", "masked/identical", "masked/tie"):
            rec[name] = int(g.total(name))
        for name in ("time_sample_s", "time_annotate_s", "time_update_s"):
            rec[name] = g.total(name) / self.accelerator.num_processes
        rec["time_step_s"] = step_time
        if rec["time_sample_s"] > 0 and g.total("generated_tokens"):
            rec["gen_tokens_per_s"] = g.total("generated_tokens") / rec["time_sample_s"] / self.accelerator.num_processes
        if rec["time_update_s"] > 0:
            rec["train_tokens_per_s"] = g.total("train_tokens") / rec["time_update_s"] / self.accelerator.num_processes
        rec["prompts_seen"] = self.stream.position
        agreement = getattr(self.annotator, "agreement", None)
        if callable(agreement):  # an ensemble: how often each member agrees with the ensemble (this process)
            rec.update({f"judge_agreement/{name}": value for name, value in agreement().items()})
        return rec

    def _audit(self, rollouts: Rollouts, plan: PairPlan, judgments: list[Judgment]) -> None:
        if self.audit is None:
            return
        import hashlib
        import json

        def h(text: str) -> str:
            return hashlib.sha1(text.encode()).hexdigest()[:12]

        for (b, ka, kb), j in zip(plan.pairs, judgments):
            self.audit.write(json.dumps({
                "step": self.step + 1, "prompt_id": rollouts.prompt_ids[b], "a": h(rollouts.texts[b][ka]),
                "b": h(rollouts.texts[b][kb]), "prob_ab": j.prob_ab, "prob_ba": j.prob_ba, "prob": j.prob,
                "latency_s": round(j.latency_s, 6), "judge": j.judge, "failure": j.failure}) + "\n")

    # -- checkpoints -----------------------------------------------------------------------
    def state(self) -> dict:
        from oaif.checkpoint import rng_state

        # the stream as of the last finished step: an interrupted step's prompts are drawn again
        return {"step": self.step, "stream": self._committed_stream, "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "rng": rng_state(), "failure_window": list(self.failure_window),
                "totals": dict(self.totals), "config": self.cfg.to_dict()}

    def save(self) -> Path | None:
        from oaif.checkpoint import save_checkpoint

        self.accelerator.wait_for_everyone()
        path = None
        if self.is_main:
            path = save_checkpoint(self.out, self.step, self.unwrapped, self.tokenizer, self.state(),
                                   keep_last=self.cfg.train.keep_last)
        self._last_saved = self.step
        self.accelerator.wait_for_everyone()
        return path or self.out / f"checkpoint-{self.step}"

    def _resume(self) -> None:
        from oaif.checkpoint import latest_checkpoint, load_model_weights, load_trainer_state, set_rng_state

        ckpt = latest_checkpoint(self.out)
        if ckpt is None:
            log.warning("train.resume=true but %s has no checkpoint: starting from step 0", self.out)
            return
        load_model_weights(self.unwrapped, ckpt)
        state = load_trainer_state(ckpt)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.stream.load_state_dict(state["stream"])
        self._committed_stream = self.stream.state_dict()
        set_rng_state(state["rng"])
        self.step = self._last_saved = int(state["step"])
        self.failure_window.extend(state.get("failure_window", []))
        self.totals.update(state.get("totals", {}))
        log.info("resumed from %s at step %d", ckpt, self.step)

    def _check_failures(self) -> None:
        w = self.failure_window
        if len(w) < w.maxlen:
            return
        rate = sum(w) / len(w)
        if rate > self.cfg.annotator.max_failure_rate:
            path = self.save()
            reasons = ", ".join(f"{k.split('/', 1)[1]}: {v}" for k, v in sorted(self.totals.items()) if k.startswith("failed/"))
            raise AnnotatorError(
                f"the annotator failed on {rate:.0%} of the last {len(w)} pairs (over annotator.max_failure_rate="
                f"{self.cfg.annotator.max_failure_rate}; reasons so far: {reasons}); saved {path}, "
                f"fix the annotator and rerun with train.resume=true")

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
            if not isinstance(e, AnnotatorError) and self.step > max(0, self._last_saved):
                try:
                    path = self.save()
                    log.error("stopped at step %d (%s); progress saved in %s, rerun with train.resume=true",
                              self.step, type(e).__name__, path)
                except Exception:  # pragma: no cover - the original error matters more
                    log.exception("could not save a checkpoint after the error")
            raise
        finally:
            bar.close()
            if self.metrics is not None:
                self.metrics.close()
            if self.audit is not None:
                self.audit.close()
        return {"final_checkpoint": str(final), "steps": self.step, "last": last, "skipped_inputs": dict(self.skipped)}


def train(cfg: Config, *, annotator=None) -> dict:
    """Set up and run a training job from a config. Returns a summary."""
    return Trainer(cfg, annotator=annotator).setup().train()
