"""Direct alignment losses (DPO, IPO, SLiC) as pure functions of per-sequence log-probs.

All three are functions of the log-ratio margin of the chosen over the rejected response,
measured against the reference model::

    rho = (log pi(y_c|x) - log pi_ref(y_c|x)) - (log pi(y_r|x) - log pi_ref(y_r|x))

    DPO   -log sigmoid(beta * rho)
    IPO   (rho - 1 / (2 * beta)) ** 2
    SLiC  max(0, 1 - beta * rho)

With soft labels, ``label_probs`` holds p = P(chosen better) from the annotator, and the loss is
the expectation over the label: ``p * l(rho) + (1 - p) * l(-rho)``, where ``l(-rho)`` is the
loss with the two responses swapped. With p = 1 this is the hard-label loss. For IPO the
expected loss is minimised at ``rho = (2p - 1) / (2 * beta)``; for DPO at
``beta * rho = logit(p)``.

Functions return unreduced per-pair values; the caller masks and reduces.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSS_TYPES = ("dpo", "ipo", "slic")


@dataclass
class PreferenceLossOutput:
    """Per-pair losses and the quantities the trainer logs."""

    losses: torch.Tensor  # (n,)
    chosen_rewards: torch.Tensor  # (n,) beta * (log pi - log pi_ref) of chosen, detached
    rejected_rewards: torch.Tensor  # (n,) same for rejected, detached
    margins: torch.Tensor  # (n,) rho, detached


def margin_loss(rho: torch.Tensor, beta: float, loss_type: str) -> torch.Tensor:
    """The loss of a log-ratio margin ``rho`` when the first response is the preferred one."""
    if loss_type == "dpo":
        return -F.logsigmoid(beta * rho)
    if loss_type == "ipo":
        return (rho - 1.0 / (2.0 * beta)) ** 2
    if loss_type == "slic":
        return torch.relu(1.0 - beta * rho)
    raise ValueError(f"unknown loss type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")


def preference_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str = "dpo",
    label_probs: torch.Tensor | None = None,
) -> PreferenceLossOutput:
    """Per-pair direct alignment loss.

    Args:
        policy_chosen_logps: (n,) summed log-probs of the chosen responses under the policy.
        policy_rejected_logps: (n,) same for the rejected responses.
        reference_chosen_logps: (n,) summed log-probs of the chosen responses under the reference.
        reference_rejected_logps: (n,) same for the rejected responses.
        beta: strength of the pull towards the reference (> 0).
        loss_type: ``"dpo"``, ``"ipo"`` or ``"slic"``.
        label_probs: optional (n,) P(chosen better) in [0, 1] for soft labels; ``None`` means 1.

    Returns:
        :class:`PreferenceLossOutput` with unreduced ``losses`` of shape (n,).
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    rho = chosen_logratios - rejected_logratios
    losses = margin_loss(rho, beta, loss_type)
    if label_probs is not None:
        p = label_probs.to(rho.dtype)
        losses = p * losses + (1.0 - p) * margin_loss(-rho, beta, loss_type)
    return PreferenceLossOutput(
        losses=losses,
        chosen_rewards=(beta * chosen_logratios).detach(),
        rejected_rewards=(beta * rejected_logratios).detach(),
        margins=rho.detach(),
    )
