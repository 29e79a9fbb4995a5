"""Step 4 of the loop: policy and reference log-probs of the responses, the loss, the backward pass.

The step's objective is the mean loss over *every* valid pair of the step, across micro-batches
and processes: each micro-batch back-propagates ``sum(pair losses) * num_processes / global_pairs``
(DDP averages gradients over processes), where ``global_pairs`` counts the whole step's pairs.
A pair weighs the same whichever micro-batch or process it landed in.

The policy and the reference forward the *same* packed batch under the *same* precision
context (accelerate's autocast wraps both forwards; see :mod:`oaif.run_setup`), so at step 0,
before any update, the log-ratio margin and the KL estimate are exactly 0.

Responses that entered no pair (tied, failed, identical) carry no loss; in online mode they are
forwarded without gradients so that ``kl`` covers every sampled response of the step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from oaif.logprobs import SequenceBatch, pack_sequences, sequence_logprobs
from oaif.losses import PreferenceLossOutput, preference_loss
from oaif.pairs import PreferenceBatch
from oaif.sampling import Rollouts


@dataclass
class UpdateStats:
    """What one micro-batch's update measured, detached."""

    loss: PreferenceLossOutput | None  # per pair (None: no pair in this micro-batch)
    chosen_logps: torch.Tensor  # (pairs,) log pi(y_c | x)
    rejected_logps: torch.Tensor  # (pairs,) log pi(y_r | x)
    kl: torch.Tensor | None  # (responses,) sum_t [log pi - log pi_ref] of every response (online), else None
    train_tokens: int  # tokens of the responses in pairs (forwarded with gradients)


class PolicyUpdate:
    """Forward and backward for one micro-batch; holds the models and the loss settings."""

    def __init__(self, accelerator, policy, reference, pad_id: int, loss_cfg, *, kl: bool):
        self.accelerator, self.policy, self.reference = accelerator, policy, reference
        self.pad_id, self.loss_cfg, self.kl = pad_id, loss_cfg, kl

    def _pack(self, rollouts: Rollouts, flat: list[int]) -> SequenceBatch:
        k = rollouts.k
        return pack_sequences([rollouts.prompt_tokens[f // k] for f in flat],
                              [rollouts.responses[f // k][f % k] for f in flat], self.pad_id).to(self.accelerator.device)

    def _reference_logps(self, batch: SequenceBatch) -> torch.Tensor:
        from oaif.models import reference_context

        with torch.no_grad(), reference_context(self.accelerator.unwrap_model(self.policy), self.reference) as ref:
            return sequence_logprobs(ref, batch)[0]

    def __call__(self, rollouts: Rollouts, prefs: PreferenceBatch, global_pairs: int,
                 must_backward: bool = False) -> UpdateStats:
        """Back-propagate this micro-batch's share of the step's loss.

        ``must_backward``: run a backward even without pairs here (a zero loss through one response),
        so that a synchronising DDP backward happens on every process.
        """
        used = prefs.responses_used()
        kl_parts = []
        in_pairs = set(used)
        rest = [f for f in range(rollouts.num_prompts * rollouts.k) if f not in in_pairs] if self.kl else []
        if rest:  # responses in no pair: the KL estimate only
            batch = self._pack(rollouts, rest)
            with torch.no_grad():
                logps = sequence_logprobs(self.accelerator.unwrap_model(self.policy), batch)[0]
            kl_parts.append(logps - self._reference_logps(batch))
        empty = torch.zeros(0, device=self.accelerator.device)
        stats = UpdateStats(None, empty, empty, None, 0)
        rows = used or ([0] if must_backward else [])
        if rows:
            batch = self._pack(rollouts, rows)
            logps = sequence_logprobs(self.policy, batch)[0]
            ref_logps = self._reference_logps(batch)
            if used:
                kl_parts.append(logps.detach() - ref_logps)
            if prefs.size:
                row = {flat: i for i, flat in enumerate(rows)}
                c = torch.tensor([row[f] for f in prefs.chosen], device=logps.device)
                r = torch.tensor([row[f] for f in prefs.rejected], device=logps.device)
                labels = torch.tensor(prefs.label_probs, device=logps.device) if self.loss_cfg.soft_labels else None
                out = preference_loss(logps[c], logps[r], ref_logps[c], ref_logps[r], self.loss_cfg.beta,
                                      self.loss_cfg.type, labels)
                loss = out.losses.sum() * (self.accelerator.num_processes / global_pairs)
                stats.loss = dataclasses.replace(out, losses=out.losses.detach())
                stats.chosen_logps, stats.rejected_logps = logps[c].detach(), logps[r].detach()
            else:
                loss = logps.sum() * 0.0
            self.accelerator.backward(loss)
            stats.train_tokens = int(batch.response_mask.sum()) if used else 0
        if self.kl:
            stats.kl = torch.cat(kl_parts) if kl_parts else empty
        return stats
