"""Step 4 of the loop: policy and reference log-probs of the responses, the loss, the backward pass.

The step's objective is the mean loss over *every* valid pair of the step, across micro-batches
and processes: each micro-batch back-propagates ``sum(pair losses) * num_processes / global_pairs``
(DDP averages gradients over processes), where ``global_pairs`` counts the whole step's pairs.
A pair weighs the same whichever micro-batch or process it landed in.

The policy and the reference forward the *same* packed batch under the *same* precision
context (accelerate's autocast wraps both forwards; see :mod:`oaif.run.build`), so at step 0,
before any update, the log-ratio margin and the KL estimate are exactly 0.

Responses that entered no pair (tied, failed, identical) carry no loss; in online mode they are
forwarded without gradients so that ``kl`` covers every sampled response of the step.

Sharded models (``train.fsdp``, :mod:`oaif.models.sharding`): every forward and backward is a collective
call, so each micro-batch first agrees on the most passes any process runs (one all-reduce) and a
process with fewer runs padding passes on a one-row batch (a zero loss: no gradient, no metric). A
process whose pairs were all masked still runs them. Gradients are reduced only in the step's last
backward (FSDP2's ``set_requires_gradient_sync``; DDP's ``no_sync`` otherwise).

A reference-free loss (``simpo``) runs no reference forward at all, so it logs no ``kl``. The
length-normalised losses (simpo, rpo, rdpo) read each response's token count from the rollouts.

``loss.reference=behavior`` (BPO) measures rho against the policy that sampled the step, i.e. the
weights before this step's update. The policy does not change until the optimizer steps after the
last micro-batch, so every pass's own log-probs, detached, *are* the behaviour policy's: rho is 0
in value (the loss is its value at rho = 0) and its gradient is the policy's. No reference
forward runs and no ``kl`` is logged (it would be 0). The reference of a TR-DPO run
(:mod:`oaif.models.reference`) is forwarded like the initial one.

The policy's per-token log-probs of the responses in pairs, computed here before the optimizer
steps, are the weights that sampled them in a synchronous run; their mean absolute difference from
the log-probs the sampler reported (``logprob_gap``, both untempered) is near 0 unless the sampler
held other weights (a missed push to a vLLM engine).
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from oaif.models.sharding import gradient_sync_off, is_sharded, max_over_processes
from oaif.step.logprobs import SequenceBatch, logprob_gap, pack_sequences, sequence_logprobs, takes_kv_cache
from oaif.step.losses import LENGTH_NORMALISED, REFERENCE_FREE, PreferenceLossOutput, preference_loss
from oaif.step.records import PreferenceBatch, Rollouts


@dataclass
class UpdateStats:
    """What one micro-batch's update measured, detached."""

    loss: PreferenceLossOutput | None  # per pair (None: no pair in this micro-batch)
    chosen_logps: torch.Tensor  # (pairs,) log pi(y_c | x)
    rejected_logps: torch.Tensor  # (pairs,) log pi(y_r | x)
    kl: torch.Tensor | None  # (responses,) sum_t [log pi - log pi_ref] of every response (online, with a reference), else None
    train_tokens: int  # tokens of the responses in pairs (forwarded with gradients)
    # (sum, tokens) of |log pi(y_t) - the sampler's log-prob| over the response tokens in pairs (logprob_gap)
    logprob_gap: tuple[float, int] = (0.0, 0)


def forward_groups(rollouts: Rollouts, flat: list[int], max_rows: int) -> list[list[int]]:
    """Split responses (flat indices) into the row sets of forward passes.

    A prompt's responses share a pass (its pairs need them in one graph); prompts are sorted by
    the length of their longest sequence, so each pass pads to its own longest row, not the whole
    micro-batch's; a pass takes prompts while it holds at most ``max_rows`` rows (0: no limit),
    and at least one prompt.
    """
    k = rollouts.k
    by_prompt: dict[int, list[int]] = {}
    for f in flat:
        by_prompt.setdefault(f // k, []).append(f)

    def longest(b: int) -> int:
        return len(rollouts.prompt_tokens[b]) + max(len(rollouts.responses[b][f % k]) for f in by_prompt[b])

    groups: list[list[int]] = []
    for b in sorted(by_prompt, key=lambda b: (longest(b), b)):
        if groups and (max_rows <= 0 or len(groups[-1]) + len(by_prompt[b]) <= max_rows):
            groups[-1].extend(by_prompt[b])
        else:
            groups.append(list(by_prompt[b]))
    return groups


class PolicyUpdate:
    """Forward and backward for one micro-batch; holds the models and the loss settings.

    ``forward_batch_size`` caps the sequences per forward pass (0: one pass for the micro-batch;
    see :func:`forward_groups`). The reference forwards every pass first, so its activations are
    gone before the policy builds its graph; the policy then forwards and back-propagates one pass
    at a time, each with the loss of the pairs in it (the step's objective is a sum over pairs).
    With ``share_prompts`` a pass forwards each prompt once for all its responses when the policy
    takes a KV cache in training (:func:`oaif.step.logprobs.takes_kv_cache`); the reference then does the same.
    """

    def __init__(self, accelerator, policy, reference, pad_id: int, loss_cfg, *, kl: bool,
                 forward_batch_size: int = 0, share_prompts: bool = True):
        self.accelerator, self.policy, self.reference = accelerator, policy, reference
        self.pad_id, self.loss_cfg, self.want_kl = pad_id, loss_cfg, kl
        self.forward_batch_size = forward_batch_size
        self.share_prompts = share_prompts and takes_kv_cache(policy)
        self.sharded = is_sharded(accelerator.unwrap_model(policy))

    def no_sync(self):
        """A block whose backwards reduce no gradient (they accumulate until a backward outside one)."""
        if self.sharded:
            return gradient_sync_off(self.accelerator.unwrap_model(self.policy))
        return self.accelerator.no_sync(self.policy) if self.accelerator.num_processes > 1 else nullcontext()

    @property
    def uses_reference(self) -> bool:
        return self.loss_cfg.type not in REFERENCE_FREE

    @property
    def behavior(self) -> bool:
        """Whether the reference is the behaviour policy (BPO): the policy's own log-probs, detached."""
        return self.uses_reference and self.loss_cfg.reference == "behavior"

    @property
    def forwards_reference(self) -> bool:
        """Whether a reference model runs (a loss with a reference, other than the behaviour policy)."""
        return self.uses_reference and not self.behavior

    @property
    def kl(self) -> bool:
        """Whether the update measures ``kl`` (online mode, and a reference model that runs)."""
        return self.want_kl and self.forwards_reference

    def _loss(self, policy: tuple, reference: tuple | None, rollouts: Rollouts, sides: tuple[list, list],
              labels) -> PreferenceLossOutput:
        """The per-pair loss of (chosen, rejected) policy and reference log-probs; ``sides`` are the chosen and
        rejected responses (flat indices), whose token counts the length-normalised losses read."""
        cfg, k = self.loss_cfg, rollouts.k
        lengths = None
        if cfg.type in LENGTH_NORMALISED:
            lengths = tuple(torch.tensor([len(rollouts.responses[f // k][f % k]) for f in side],
                                         device=self.accelerator.device) for side in sides)
        alpha = cfg.rpo_alpha if cfg.type == "rpo" else cfg.rdpo_alpha
        return preference_loss(*policy, *(reference or (None, None)),
                               cfg.simpo_beta if cfg.type == "simpo" else cfg.beta, cfg.type, labels,
                               lengths=lengths, alpha=alpha, gamma_beta_ratio=cfg.simpo_gamma_beta_ratio,
                               label_smoothing=cfg.label_smoothing)

    def _pack(self, rollouts: Rollouts, flat: list[int]) -> SequenceBatch:
        k = rollouts.k
        return pack_sequences([rollouts.prompt_tokens[f // k] for f in flat],
                              [rollouts.responses[f // k][f % k] for f in flat], self.pad_id).to(self.accelerator.device)

    def _reference_logps(self, batch: SequenceBatch) -> torch.Tensor:
        from oaif.models.modules import reference_context

        with torch.no_grad(), reference_context(self.accelerator.unwrap_model(self.policy), self.reference) as ref:
            return sequence_logprobs(ref, batch, share_prompts=self.share_prompts)[0]

    def _kl_only(self, rollouts: Rollouts, groups: list[list[int]], passes: int) -> list[torch.Tensor]:
        """log pi - log pi_ref of responses in no pair, without gradients; ``passes`` >= len(groups) (padding)."""
        parts = []
        for i in range(passes):
            batch = self._pack(rollouts, groups[i] if i < len(groups) else [0])
            ref = self._reference_logps(batch)
            with torch.no_grad():
                policy = self.accelerator.unwrap_model(self.policy)
                logps = sequence_logprobs(policy, batch, share_prompts=self.share_prompts)[0]
            if i < len(groups):
                parts.append(logps - ref)
        return parts

    def _pass_counts(self, kl_groups: list, groups: list) -> tuple[int, int]:
        """(kl-only passes, update passes) this process runs: its own, or under FSDP the most of any process."""
        counts = [len(kl_groups), len(groups)]
        return tuple(max_over_processes(counts, self.accelerator.device) if self.sharded else counts)

    def __call__(self, rollouts: Rollouts, prefs: PreferenceBatch, global_pairs: int,
                 must_backward: bool = False) -> UpdateStats:
        """Back-propagate this micro-batch's share of the step's loss.

        ``must_backward``: run a backward even without pairs here (a zero loss through one response),
        so that a synchronising DDP backward happens on every process.
        """
        used = prefs.responses_used()
        in_pairs = set(used)
        rest = [f for f in range(rollouts.num_prompts * rollouts.k) if f not in in_pairs] if self.kl else []
        rows = used or ([0] if must_backward else [])
        kl_groups = forward_groups(rollouts, rest, self.forward_batch_size) if rest else []
        groups = forward_groups(rollouts, rows, self.forward_batch_size) if rows else []
        kl_passes, passes = self._pass_counts(kl_groups, groups)
        kl_parts = self._kl_only(rollouts, kl_groups, kl_passes)
        empty = torch.zeros(0, device=self.accelerator.device)
        stats = UpdateStats(None, empty, empty, None, 0)
        batches = [self._pack(rollouts, g) for g in groups] + [self._pack(rollouts, [0])] * (passes - len(groups))
        if batches:
            device = self.accelerator.device
            ref = None
            if self.forwards_reference:  # padding passes (the batches past groups) forward too, their values unused
                ref = {f: v for g, b in zip(groups + [[]] * (passes - len(groups)), batches)
                       for f, v in zip(g, self._reference_logps(b).tolist())}
            pol, stats.logprob_gap = self._policy_passes(rollouts, groups, batches, ref, prefs, global_pairs)
        if rows:
            logps = torch.tensor([pol[f] for f in rows], dtype=torch.float32, device=device)
            ref_logps = (torch.tensor([ref[f] for f in rows], dtype=torch.float32, device=device) if ref is not None
                         else logps.clone() if self.behavior else None)
            if used:
                if self.kl:
                    kl_parts.append(logps - ref_logps)
                stats.train_tokens = sum(int(b.response_mask.sum()) for b in batches[:len(groups)])
            if prefs.size:
                at = {f: i for i, f in enumerate(rows)}
                c, r = [at[f] for f in prefs.chosen], [at[f] for f in prefs.rejected]
                refs = (ref_logps[c], ref_logps[r]) if ref_logps is not None else None
                stats.loss = self._loss((logps[c], logps[r]), refs, rollouts, (prefs.chosen, prefs.rejected),
                                        self._labels(prefs, range(prefs.size)))
                stats.loss = dataclasses.replace(stats.loss, losses=stats.loss.losses.detach())
                stats.chosen_logps, stats.rejected_logps = logps[c], logps[r]
        if self.kl:
            stats.kl = torch.cat(kl_parts) if kl_parts else empty
        return stats

    def _labels(self, prefs: PreferenceBatch, pairs) -> torch.Tensor | None:
        if not self.loss_cfg.soft_labels:
            return None
        return torch.tensor([prefs.label_probs[j] for j in pairs], device=self.accelerator.device)

    def _policy_passes(self, rollouts: Rollouts, groups, batches, ref: dict[int, float] | None,
                       prefs: PreferenceBatch, global_pairs: int) -> tuple[dict[int, float], tuple[float, int]]:
        """Forward and backward each pass with the loss of its pairs; the policy's log-probs, detached, and
        the (sum, tokens) of their per-token distance to the sampler's over the responses in pairs."""
        scale = self.accelerator.num_processes / global_pairs if global_pairs else 0.0
        pol: dict[int, float] = {}
        gap, sampled, paired = [0.0, 0], rollouts.sample_logprobs, set(prefs.chosen) | set(prefs.rejected)
        for i, batch in enumerate(batches):
            group = groups[i] if i < len(groups) else []  # past groups: a padding pass (FSDP), no pair
            last = i == len(batches) - 1
            # only the micro-batch's last backward may reduce gradients (the trainer's no_sync covers the others)
            with nullcontext() if last else self.no_sync():
                logps, per_token = sequence_logprobs(self.policy, batch, share_prompts=self.share_prompts)
                row = {f: j for j, f in enumerate(group)}
                pairs = [j for j, f in enumerate(prefs.chosen) if f in row]
                if pairs:
                    chosen, rejected = [prefs.chosen[j] for j in pairs], [prefs.rejected[j] for j in pairs]
                    c = torch.tensor([row[f] for f in chosen], device=logps.device)
                    r = torch.tensor([row[f] for f in rejected], device=logps.device)
                    refs = self._pair_references(ref, logps, (c, r), (chosen, rejected))
                    out = self._loss((logps[c], logps[r]), refs, rollouts, (chosen, rejected), self._labels(prefs, pairs))
                    loss = out.losses.sum() * scale
                else:  # no pair here (must_backward): a zero loss that still runs a backward
                    loss = logps.sum() * 0.0
                self.accelerator.backward(loss)
            pol.update(zip(group, logps.detach().tolist()))
            # the weights that should have sampled: this step's, before the optimizer (not for a padding pass)
            if sampled is not None and group:
                s, n = logprob_gap(per_token, batch.response_mask,
                                   [sampled[f // rollouts.k][f % rollouts.k] if f in paired else None for f in group])
                gap[0], gap[1] = gap[0] + s, gap[1] + n
        return pol, (gap[0], gap[1])

    def _pair_references(self, ref: dict[int, float] | None, logps: torch.Tensor, at: tuple, sides: tuple):
        """The (chosen, rejected) reference log-probs of a pass's pairs: the reference's, or (behavior) the
        pass's own policy log-probs, detached; None for a reference-free loss."""
        if ref is not None:
            return tuple(torch.tensor([ref[f] for f in side], device=logps.device) for side in sides)
        return tuple(logps[i].detach() for i in at) if self.behavior else None


def accumulate(update: PolicyUpdate, micro_batches: list, global_pairs: int, metrics) -> None:
    """Step 4 on each of a step's micro-batches (``.rollouts``, ``.prefs``): forward and backward, the gradients
    accumulating. DDP and FSDP reduce gradients in the last micro-batch's backward, so with several processes
    every process runs one there, even without a pair of its own. ``metrics``: the step's
    :class:`oaif.run.metrics.StepMetrics` (update seconds and the update's numbers)."""
    several = update.accelerator.num_processes > 1
    for i, mb in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with metrics.timed("update"), nullcontext() if last else update.no_sync():
            metrics.add_update(update(mb.rollouts, mb.prefs, global_pairs,
                                      must_backward=last and several and global_pairs > 0))
