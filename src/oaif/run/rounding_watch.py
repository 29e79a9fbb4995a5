"""A warning when low-precision weights swallow the optimizer's updates.

With ``model.dtype=bfloat16`` the optimizer updates the weights in bfloat16, as TRL and torchtune
do with a model loaded in bf16 (no float32 master copy). An update smaller than half the spacing
of bfloat16 numbers around a weight (about 2^-9 of its magnitude) rounds to nothing, and at the
learning rates of preference tuning that can be most weights: the loss still moves a little, but
the run trains far less than it says. The first optimizer step that updates low-precision
weights is watched: the share of them it changed (on a strided sample of each tensor) is logged,
and a warning names the way out when fewer than half changed.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("oaif")

LOW_PRECISION = (torch.bfloat16, torch.float16)
STRIDE = 97  # every 97th element of each tensor: about 1% of the weights, enough for a share
WARN_BELOW = 0.5


def _local(p: torch.Tensor) -> torch.Tensor:
    """This process's part of ``p`` (its shard under FSDP, where ``p`` is a DTensor)."""
    return p.to_local() if hasattr(p, "to_local") else p


def changed_share(before: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """The share of sampled elements that differ now from their copies in ``before`` ((param, sample) pairs)."""
    changed = total = 0
    for p, old in before:
        changed += int((_local(p).detach().reshape(-1)[::STRIDE] != old).sum())
        total += old.numel()
    return changed / total if total else 1.0


def watch_first_update(optimizer: torch.optim.Optimizer, *, speak: bool) -> None:
    """Hook ``optimizer`` (a torch optimizer, before accelerate wraps it) so that its first step with
    a non-zero learning rate and a gradient on low-precision weights logs the share of them it
    changed (``speak``: this process logs), then unhooks itself."""
    if not any(p.dtype in LOW_PRECISION for group in optimizer.param_groups for p in group["params"]):
        return
    sample: list[tuple[torch.Tensor, torch.Tensor]] = []
    lr = [0.0]

    def before(opt, args, kwargs):
        lr[0] = max(group["lr"] for group in opt.param_groups)
        sample[:] = [] if lr[0] <= 0 else [
            (p, _local(p).detach().reshape(-1)[::STRIDE].clone()) for group in opt.param_groups
            for p in group["params"] if p.grad is not None and p.dtype in LOW_PRECISION]

    def after(opt, args, kwargs):
        if not sample:  # no gradient (no pair), lr 0 (warm-up) or no low-precision weight: watch the next step
            return
        share = changed_share(sample)
        dtype = str(sample[0][0].dtype).removeprefix("torch.")
        sample.clear()
        for handle in handles:
            handle.remove()
        if not speak:
            return
        if share < WARN_BELOW:
            log.warning("model.dtype=%s: the first optimizer step changed only %.1f%% of the weights with a gradient "
                        "(lr %g): updates below a weight's %s spacing round away, so this run trains much less "
                        "than its loss suggests; use float32 weights with train.mixed_precision=bf16 (bf16 compute, "
                        "float32 updates), or LoRA, or a larger optim.lr", dtype, 100 * share, lr[0], dtype)
        else:
            log.info("model.dtype=%s: the first optimizer step changed %.1f%% of the weights with a gradient (lr %g)",
                     dtype, 100 * share, lr[0])

    handles = [optimizer.register_step_pre_hook(before), optimizer.register_step_post_hook(after)]
