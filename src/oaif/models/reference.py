"""The reference the loss measures the policy against, and how it moves (``loss.reference*``).

- ``initial`` (the default): the starting policy, fixed. Full fine-tuning holds a frozen copy of
  the model; LoRA holds nothing (the base with the adapter disabled).
- ``behavior`` (BPO, Xu et al. 2024): the policy that sampled the step's responses. oaif takes one
  optimizer step per sampled batch and the policy does not change while a step collects and
  back-propagates, so the behaviour policy's log-probs are the policy's own, detached
  (:mod:`oaif.step.update`): no copy, no reference forward, nothing to save.
- TR-DPO (Gorbatovski et al. 2024) moves the initial reference after a step:
  ``loss.reference_sync_every=N`` copies the policy into it after every N-th step,
  ``loss.reference_mix=alpha`` mixes it, ``ref <- alpha * policy + (1 - alpha) * ref`` parameter by
  parameter, after every step (every N-th with both keys, as TRL's ``sync_ref_model`` does).
  Full fine-tuning moves the frozen copy; LoRA holds a copy of the adapter
  (:class:`~oaif.models.modules.ReferenceAdapter`, the size of the adapter) and moves that, so the
  soft update mixes the adapter's A and B matrices (the parameters trained), not their product.

:class:`MovingReference` is TR-DPO's state: its tensors go into each checkpoint (``reference/``)
and come back on resume, so a resumed run moves the same reference as an uninterrupted one.
"""

from __future__ import annotations

from typing import Any

import torch

from oaif.errors import CheckpointError
from oaif.models.modules import ReferenceAdapter, _unwrap


def moves(loss_cfg) -> bool:
    """Whether the reference changes during the run (``behavior``, or a TR-DPO update): it is then not the
    starting model, so a judge that would reuse the starting model loads its own."""
    return loss_cfg.reference == "behavior" or loss_cfg.reference_sync_every > 0 or loss_cfg.reference_mix > 0


def training_reference(loss_cfg, policy, reference) -> tuple[Any, "MovingReference | None"]:
    """``(the reference the update forwards, its MovingReference or None)`` for a built run.

    ``reference`` is the frozen copy (full fine-tuning) or None (LoRA); under a TR-DPO update a
    LoRA reference becomes a copy of the policy's starting adapter.
    """
    if loss_cfg.reference_sync_every <= 0 and loss_cfg.reference_mix <= 0:
        return reference, None
    if reference is None:
        reference = ReferenceAdapter.copy_of(policy)
    return reference, MovingReference(reference, loss_cfg.reference_sync_every, loss_cfg.reference_mix)


class MovingReference:
    """TR-DPO's reference updates on a frozen copy of the model or a :class:`ReferenceAdapter`.

    ``every`` (0: every step) is how often it moves; ``alpha`` (0: 1, a hard copy) how far.
    """

    def __init__(self, reference, every: int, alpha: float):
        self.reference, self.every, self.alpha = reference, max(1, every), alpha if alpha > 0 else 1.0

    def tensors(self) -> dict[str, torch.Tensor]:
        """The reference's moving tensors by the policy's parameter names."""
        if isinstance(self.reference, ReferenceAdapter):
            return self.reference.tensors
        return dict(_unwrap(self.reference).named_parameters())

    def after_step(self, policy, step: int) -> bool:
        """Move the reference towards ``policy`` after optimizer step ``step`` when one is due; whether it moved."""
        if step % self.every:
            return False
        params = dict(_unwrap(policy).named_parameters())
        with torch.no_grad():
            for name, ref in self.tensors().items():
                p = params[name]
                if self.alpha == 1.0:
                    ref.copy_(p)
                else:  # in float32, rounded once to the reference's dtype
                    ref.copy_((self.alpha * p.float() + (1.0 - self.alpha) * ref.float()).to(ref.dtype))
        return True

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The reference's tensors on the CPU, for a checkpoint."""
        return {name: t.detach().to("cpu", copy=True).contiguous() for name, t in self.tensors().items()}

    def load_state_dict(self, saved: dict[str, torch.Tensor], where) -> None:
        """Put a checkpoint's reference tensors back; another model's or adapter's is a CheckpointError."""
        own = self.tensors()
        missing, unexpected = sorted(own.keys() - saved.keys()), sorted(saved.keys() - own.keys())
        shapes = [n for n in own.keys() & saved.keys() if tuple(own[n].shape) != tuple(saved[n].shape)]
        if missing or unexpected or shapes:
            raise CheckpointError(f"{where}: the saved reference does not fit this run's (missing {missing[:2]}, "
                                  f"unexpected {unexpected[:2]}, other shapes {sorted(shapes)[:2]})")
        with torch.no_grad():
            for name, t in own.items():
                t.copy_(saved[name].to(t.dtype))
