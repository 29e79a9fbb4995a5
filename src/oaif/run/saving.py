"""A trainer's checkpoints: a resume, what it saves, the state a checkpoint holds, and the failure stops that save.

Every function takes the :class:`oaif.trainer.Trainer` and is called by every process together
(:mod:`oaif.run.loop` at the save cadence, on a stop signal, at the end; or on an error). Under
``train.fsdp`` the weights and the optimizer state are gathered whole for the write; with
``train.async_steps`` the queued steps' batches are kept with the checkpoint (a collective call)."""

from __future__ import annotations

from pathlib import Path

from oaif.errors import AnnotatorError, TrainingError
from oaif.models.sharding import full_optimizer_state, full_parameters
from oaif.redaction import redact


def restore(t) -> int:
    """Load the checkpoint ``train.resume`` names into the trainer's parts; the step it was saved at. Sharded,
    each process keeps its shard of the weights."""
    with full_parameters(t.unwrapped, write_back=True):
        return t.checkpoints.restore(t.cfg.train.resume, t.unwrapped, t.optimizer, t.scheduler, t.stream,
                                     t.failures, config=redact(t.cfg.to_dict()))


def save(t) -> Path:
    """Write ``checkpoint-<step>`` (see :class:`oaif.run.checkpoint.RunCheckpoints`)."""
    queued = t.ahead.checkpoint_state(t.accelerator, t.stream.state_dict()) if t.ahead is not None else None
    if not t.parts.sharded:
        return t.checkpoints.save(t.step, t.unwrapped, t.tokenizer, lambda: state(t, queued=queued))
    optimizer = full_optimizer_state(t.optimizer)  # gathered on every process, written by the main one
    with full_parameters(t.unwrapped):
        return t.checkpoints.save(t.step, t.unwrapped, t.tokenizer, lambda: state(t, optimizer, queued))


def state(t, optimizer: dict | None = None, queued: dict | None = None) -> dict:
    """The trainer state a checkpoint holds (``trainer_state.pt``); ``optimizer``: its state gathered whole
    (sharded); ``queued``: the async steps' batches (none in a save after an error: no collective call then)."""
    from oaif.run.checkpoint import trainer_state

    # the stream as of the last finished step: an interrupted step's prompts are drawn again
    out = trainer_state(t.step, t.committed_stream, optimizer or t.optimizer, t.scheduler, t.failures,
                        redact(t.cfg.to_dict()))  # as saved: no credentials from a URL
    if queued is not None:
        out["async"] = queued
    return out


def save_after_error(t, error: BaseException) -> None:
    """The progress kept after ``error`` (see :meth:`oaif.run.checkpoint.RunCheckpoints.save_after_error`)."""
    t.checkpoints.save_after_error(t.step, t.unwrapped, t.tokenizer, lambda: state(t), error)


def check_failures(t, end: bool = False) -> None:
    """Stop when the annotator failed too often: over the last full window, or (``end``) over the pairs this
    process saw when fewer than a window. At the end, a run that used no pair at all is an error too
    (:class:`TrainingError`), so that it never looks like success. Every process sees the same summed counts:
    they stop (and save) together."""
    if problem := t.failures.exceeded(t.cfg.annotator.max_failure_rate, partial=end):
        raise AnnotatorError(f"{problem}; saved {save(t)}, fix the annotator and rerun with train.resume=true")
    if end and (problem := t.failures.unused()):
        raise TrainingError(f"{problem}; saved {save(t)}")
