"""Direct alignment losses as pure functions of per-sequence log-probs (and response lengths).

DPO, IPO and SLiC are functions of the log-ratio margin of the chosen over the rejected
response, measured against the reference model::

    rho = (log pi(y_c|x) - log pi_ref(y_c|x)) - (log pi(y_r|x) - log pi_ref(y_r|x))

    DPO   -log sigmoid(beta * rho)
    IPO   (rho - 1 / (2 * beta)) ** 2
    SLiC  max(0, 1 - beta * rho)

The other losses also read the responses' token counts ``|y|``:

    SimPO -log sigmoid(beta * (log pi(y_c)/|y_c| - log pi(y_r)/|y_r| - gamma/beta))
          (Meng et al. 2024; reference-free: no pi_ref, so no reference forward)
    RPO   DPO(rho) - alpha * log pi(y_c)/|y_c|
          (Pang et al. 2024: DPO plus alpha times the chosen response's length-normalised NLL)
    R-DPO -log sigmoid(beta * rho + alpha * (|y_c| - |y_r|))
          (Park et al. 2024, Eq. 9: from max E[r - alpha |y|] - beta KL, the implicit reward is
          beta * log-ratio + alpha |y|; a longer chosen response explains part of its win, so
          the policy is pushed less towards length)

With soft labels, ``label_probs`` holds p = P(chosen better) from the annotator, and the loss is
the expectation over the label: ``p * l(c, r) + (1 - p) * l(r, c)``, where ``l(r, c)`` is the
loss with the two responses swapped (for the margin losses ``l(-rho)``). With p = 1 this is the
hard-label loss. For IPO the expected loss is minimised at ``rho = (2p - 1) / (2 * beta)``; for
DPO at ``beta * rho = logit(p)``.

``label_smoothing`` = eps (DPO and IPO only) assumes each label is flipped with probability eps:
the label becomes ``p * (1 - eps) + (1 - p) * eps``. For DPO that is the conservative DPO (cDPO)
of Mitchell (2023), ``(1 - eps) * l(rho) + eps * l(-rho)``; for IPO the same expectation, whose
optimum moves to ``rho = (1 - 2 eps) / (2 * beta)``.

Functions return unreduced per-pair values; the caller masks and reduces.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSS_TYPES = ("dpo", "ipo", "slic", "simpo", "rpo", "rdpo")
#: Losses without a reference model: the update runs no reference forward and logs no ``kl``.
REFERENCE_FREE = ("simpo",)
#: Losses that read the responses' token counts.
LENGTH_NORMALISED = ("simpo", "rpo", "rdpo")
#: Losses that ``label_smoothing`` applies to.
SMOOTHABLE = ("dpo", "ipo")


@dataclass
class PreferenceLossOutput:
    """Per-pair losses and the quantities the trainer logs.

    Rewards are the loss's implicit rewards: ``beta * (log pi - log pi_ref)`` for the losses with a
    reference (DPO's; RPO's and R-DPO's are DPO's), ``beta * log pi(y) / |y|`` for SimPO. ``margins``
    is rho, or for SimPO the margin of the average log-probs ``log pi(y_c)/|y_c| - log pi(y_r)/|y_r|``.
    """

    losses: torch.Tensor  # (n,)
    chosen_rewards: torch.Tensor  # (n,) the chosen response's implicit reward, detached
    rejected_rewards: torch.Tensor  # (n,) same for rejected, detached
    margins: torch.Tensor  # (n,) rho (SimPO: the average log-prob margin), detached


def margin_loss(rho: torch.Tensor, beta: float, loss_type: str) -> torch.Tensor:
    """The loss of a log-ratio margin ``rho`` when the first response is the preferred one (DPO, IPO, SLiC)."""
    if loss_type == "dpo":
        return -F.logsigmoid(beta * rho)
    if loss_type == "ipo":
        return (rho - 1.0 / (2.0 * beta)) ** 2
    if loss_type == "slic":
        return torch.relu(1.0 - beta * rho)
    raise ValueError(f"unknown loss type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")


@dataclass(frozen=True)
class _Sides:
    """Per-sequence values of the two responses of each pair: policy log-probs, reference log-probs, lengths."""

    policy: torch.Tensor
    reference: torch.Tensor | None
    length: torch.Tensor | None


def _directed(a: _Sides, b: _Sides, beta: float, loss_type: str, alpha: float, gamma_beta_ratio: float) -> torch.Tensor:
    """The loss when response ``a`` is the preferred one of each pair."""
    if loss_type == "simpo":
        return -F.logsigmoid(beta * (a.policy / a.length - b.policy / b.length - gamma_beta_ratio))
    rho = (a.policy - a.reference) - (b.policy - b.reference)
    if loss_type == "rpo":
        return -F.logsigmoid(beta * rho) - alpha * a.policy / a.length
    if loss_type == "rdpo":
        return -F.logsigmoid(beta * rho + alpha * (a.length - b.length))
    return margin_loss(rho, beta, loss_type)


def _check(loss_type: str, beta: float, label_smoothing: float, reference, lengths) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if label_smoothing and loss_type not in SMOOTHABLE:
        raise ValueError(f"label_smoothing applies to {' and '.join(SMOOTHABLE)}, not {loss_type}")
    if not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if reference is None and loss_type not in REFERENCE_FREE:
        raise ValueError(f"{loss_type} needs the reference log-probs")
    if lengths is None and loss_type in LENGTH_NORMALISED:
        raise ValueError(f"{loss_type} needs the responses' token counts")


def preference_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor | None,
    reference_rejected_logps: torch.Tensor | None,
    beta: float,
    loss_type: str = "dpo",
    label_probs: torch.Tensor | None = None,
    *,
    lengths: tuple[torch.Tensor, torch.Tensor] | None = None,
    alpha: float = 0.0,
    gamma_beta_ratio: float = 0.0,
    label_smoothing: float = 0.0,
) -> PreferenceLossOutput:
    """Per-pair direct alignment loss.

    Args:
        policy_chosen_logps: (n,) summed log-probs of the chosen responses under the policy.
        policy_rejected_logps: (n,) same for the rejected responses.
        reference_chosen_logps: (n,) summed log-probs of the chosen responses under the reference
            (``None`` for a reference-free loss, :data:`REFERENCE_FREE`).
        reference_rejected_logps: (n,) same for the rejected responses.
        beta: the loss's scale (> 0): DPO's beta, or SimPO's.
        loss_type: one of :data:`LOSS_TYPES`.
        label_probs: optional (n,) P(chosen better) in [0, 1] for soft labels; ``None`` means 1.
        lengths: (chosen, rejected) token counts, (n,) each; needed by simpo, rpo and rdpo.
        alpha: RPO's NLL weight, or R-DPO's length coefficient (per token).
        gamma_beta_ratio: SimPO's target margin gamma over beta.
        label_smoothing: the probability that a label is flipped (dpo and ipo only).

    Returns:
        :class:`PreferenceLossOutput` with unreduced ``losses`` of shape (n,).
    """
    _check(loss_type, beta, label_smoothing, reference_chosen_logps, lengths)
    c_len, r_len = (None, None) if lengths is None else (x.to(policy_chosen_logps.dtype).clamp(min=1) for x in lengths)
    c = _Sides(policy_chosen_logps, reference_chosen_logps, c_len)
    r = _Sides(policy_rejected_logps, reference_rejected_logps, r_len)
    losses = _directed(c, r, beta, loss_type, alpha, gamma_beta_ratio)
    p = None if label_probs is None else label_probs.to(losses.dtype)
    if label_smoothing:
        p = torch.ones_like(losses) if p is None else p
        p = p * (1.0 - label_smoothing) + (1.0 - p) * label_smoothing
    if p is not None:
        losses = p * losses + (1.0 - p) * _directed(r, c, beta, loss_type, alpha, gamma_beta_ratio)
    if loss_type in REFERENCE_FREE:
        chosen, rejected = c.policy / c.length, r.policy / r.length
    else:
        chosen, rejected = c.policy - c.reference, r.policy - r.reference
    return PreferenceLossOutput(
        losses=losses,
        chosen_rewards=(beta * chosen).detach(),
        rejected_rewards=(beta * rejected).detach(),
        margins=(chosen - rejected).detach(),
    )
