"""What a resumed run may change: the saved config against the new one, and the schedule's new length.

A checkpoint's ``trainer_state.pt`` holds the config it was trained with. Resuming with a change
that makes it another experiment (the loss, the model, the data, the lr, the seed, ...) would mix
two runs in one ``metrics.jsonl``, so it is refused with the keys that differ, unless each is
named in ``train.resume_allow_changes``. :data:`SAFE_KEYS` may always change: how long to train,
how often and how much to save, where the run lives, logging, and how to reach the annotator
server (its timeout, retries, concurrency, URL and key variable), and the update's forward batch
size (speed and memory only) and ``train.fsdp`` (checkpoints are full either way), none of which changes what a
step computes. The reference (``loss.reference*``) is the loss's anchor: changing it is refused like
the loss itself, also against a checkpoint saved before those keys existed (:data:`ASSUMED_WHEN_ABSENT`). (``train.max_steps`` changes the length of a decaying schedule; the step's lr is
then recomputed for the new length, see :func:`reschedule`; it may not fall below the checkpoint's
step.) An allowed change of ``optim.*`` takes effect: the restored optimizer and schedule get the
new config's lr, betas, eps and weight decay back (:func:`reapply`).
"""

from __future__ import annotations

from oaif.config import flatten
from oaif.errors import ConfigError

#: Keys (or groups, ending in '.') a resume may change without being allowed explicitly.
SAFE_KEYS = ("train.max_steps", "train.save_every", "train.keep_last", "train.resume", "train.resume_allow_changes",
             "train.overwrite_output_dir", "train.output_dir", "train.forward_batch_size",
             "train.share_prompt_forward", "train.fsdp", "train.logprob_gap_warn", "model.cache_dir", "logging.",
             "annotator.request_timeout", "annotator.max_retries", "annotator.concurrency", "annotator.base_url",
             "annotator.api_key_env", "annotator.audit_log", "annotator.noise_window")


def _safe(key: str, allowed: list[str]) -> bool:
    return any(key == s or (s.endswith(".") and key.startswith(s)) for s in (*SAFE_KEYS, *allowed))


#: Keys added to oaif since some checkpoints were saved, with the value such a checkpoint's run had: a resume
#: compares them with it (a run anchored at its starting policy may not silently go on against a moving one).
ASSUMED_WHEN_ABSENT = {"loss.reference": "initial", "loss.reference_sync_every": 0, "loss.reference_mix": 0.0}


def config_changes(saved: dict, current: dict) -> dict[str, tuple]:
    """``{key: (saved value, new value)}`` for every key whose value differs; keys the checkpoint
    does not know (added to oaif since) are not compared, except :data:`ASSUMED_WHEN_ABSENT`'s."""
    old, new = ASSUMED_WHEN_ABSENT | flatten(saved), flatten(current)
    return {k: (old[k], new[k]) for k in new if k in old and old[k] != new[k]}


def _short(value) -> str:
    """A value for the message; a long one by its end (paths and callables differ there)."""
    text = repr(value)
    return text if len(text) <= 48 else "..." + text[-45:]


def check_resume_config(saved: dict, current: dict, checkpoint) -> None:
    """Raise :class:`ConfigError` listing the keys that differ from the checkpoint's config and may not."""
    allowed = list(flatten(current).get("train.resume_allow_changes") or [])
    refused = {k: v for k, v in config_changes(saved, current).items() if not _safe(k, allowed)}
    if refused:
        listed = ", ".join(f"{k} ({_short(a)} -> {_short(b)})" for k, (a, b) in refused.items())
        raise ConfigError(f"train.resume: {checkpoint} was trained with another config: {listed}; that would be "
                          f"another experiment. Resume with the saved values, start a new run in another "
                          f"train.output_dir, or allow the change with train.resume_allow_changes=[{','.join(refused)}]")


def check_resume_step(step: int, max_steps: int, checkpoint) -> None:
    """Refuse a ``train.max_steps`` below the checkpoint's step (there is nothing to train up to it)."""
    if max_steps < step:
        raise ConfigError(f"train.max_steps={max_steps} is below the step of {checkpoint} ({step}): nothing is left "
                          f"to train; raise train.max_steps, or resume from an earlier checkpoint with "
                          f"train.resume=<run>/checkpoint-N")


#: The settings of each optimizer group that come from the config (``optim.*``); the lr comes from the schedule.
GROUP_SETTINGS = ("betas", "eps", "weight_decay")


def optimizer_settings(optimizer, scheduler) -> dict:
    """The optimizer's and schedule's settings as this run built them from its config (before a resume loads
    the saved state, which brings back the saved run's): each group's betas, eps, weight decay, and base lr."""
    return {"groups": [{k: group[k] for k in GROUP_SETTINGS if k in group} for group in optimizer.param_groups],
            "base_lrs": list(scheduler.base_lrs)}


def reapply(optimizer, scheduler, settings: dict) -> None:
    """After loading a saved optimizer and schedule, put back the new config's ``settings``
    (:func:`optimizer_settings`), so that an allowed change of ``optim.*`` takes effect; the
    moments and the step count stay restored. Then set this step's lr (:func:`reschedule`)."""
    for group, values, base in zip(optimizer.param_groups, settings["groups"], settings["base_lrs"]):
        group.update(values)
        group["initial_lr"] = base
    scheduler.base_lrs = list(settings["base_lrs"])
    reschedule(optimizer, scheduler)


def reschedule(optimizer, scheduler) -> None:
    """Set the optimizer's lr for the restored step from the scheduler's *current* lambdas.

    A restored optimizer holds the lr of the saved run's schedule; with a new ``train.max_steps``
    a decaying schedule has another value at this step (at the old last step, linear decay had
    reached 0), so the first resumed step would train at the stale lr.
    """
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if lambdas is None:
        return
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, lambdas)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs
