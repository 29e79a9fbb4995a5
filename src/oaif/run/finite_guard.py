"""Non-finite training is stopped, never saved.

After each step the loop checks the step's loss and gradient norm (both already summed over every
process, so every process reaches the same verdict); a checkpoint is written only when every
weight is finite (each process checks its own copy, identical under DDP, so all agree). A run
that diverges ends with :class:`NonFiniteError` and leaves ``latest`` at its last good checkpoint.
"""

from __future__ import annotations

import math

import torch

from oaif.errors import OaifError

#: What to try when a run diverges, in the message.
ADVICE = ("lower optim.lr, keep optim.max_grad_norm > 0, use model.dtype=float32 or bfloat16, "
          "or a smaller loss.beta for IPO")


class NonFiniteError(OaifError):
    """Training produced a NaN or an infinity; nothing non-finite was saved."""


def _last_good(last_saved: int) -> str:
    return f"the last good checkpoint is checkpoint-{last_saved} (latest)" if last_saved > 0 else "no checkpoint was saved"


def check_step(record: dict, step: int, last_saved: int) -> None:
    """Raise :class:`NonFiniteError` when the step's ``loss`` or ``grad_norm`` is NaN or infinite."""
    bad = [f"{k}={record[k]}" for k in ("loss", "grad_norm")
           if isinstance(record.get(k), float) and not math.isfinite(record[k])]
    if bad:
        raise NonFiniteError(f"step {step}: {' and '.join(bad)} is not finite; stopped without saving it, "
                             f"{_last_good(last_saved)}; {ADVICE}")


@torch.no_grad()
def non_finite_parameters(model) -> list[str]:
    """Names of the trainable parameters holding a NaN or an infinity."""
    return [name for name, p in model.named_parameters() if p.requires_grad and not bool(torch.isfinite(p).all())]


def check_weights(model, step: int, last_saved: int) -> None:
    """Raise :class:`NonFiniteError` before a checkpoint of non-finite weights is written."""
    bad = non_finite_parameters(model)
    if bad:
        raise NonFiniteError(f"step {step}: {len(bad)} weight tensors are not finite (e.g. {bad[0]}); not saved, "
                             f"{_last_good(last_saved)}; {ADVICE}")
