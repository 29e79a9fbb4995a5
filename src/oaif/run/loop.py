"""The run around the steps: progress bar, metrics lines, the save cadence, and the ways a run
stops (a non-finite step, too many failed judgments, SIGTERM/SIGUSR1/Ctrl-C, an error), each of
which leaves the progress saved (or, for a non-finite step, the last finite checkpoint as
``latest``). :meth:`oaif.trainer.Trainer.train` calls :func:`run_steps`."""

from __future__ import annotations

import os
import sys

from oaif.errors import AnnotatorError, CheckpointWriteError, TrainingError
from oaif.run.finite_guard import NonFiniteError, check_step
from oaif.run.metrics import GapWatch, gap_warn_limit
from oaif.run.saving import check_failures, save, save_after_error
from oaif.run.stop_signals import StopSignals, Stopped

BAR_KEYS = ("loss", "reward_accuracy", "kl", "response_length", "judge_consistency")


def run_steps(t) -> dict:
    """Run an :class:`oaif.trainer.Trainer`'s ``run_step()`` until ``train.max_steps``, then save the final checkpoint. Returns a summary."""
    from tqdm.auto import tqdm

    cfg = t.cfg
    bar = tqdm(total=cfg.train.max_steps, initial=t.step, desc=f"oaif {cfg.train.mode} {cfg.loss.type}",
               disable=not (t.is_main and cfg.logging.progress_bar), dynamic_ncols=True)
    last: dict = {}
    # synchronous: the sampler holds the policy, so a gap means a missed push; with async_steps the sampler's
    # weights are older by design, and the gap (still logged) measures that, so it warns of nothing
    gap_watch = GapWatch(gap_warn_limit(cfg, t.unwrapped) if cfg.train.async_steps == 0 else 0.0)
    signals = StopSignals(immediate_second=t.accelerator.num_processes == 1).install()
    try:
        while t.step < cfg.train.max_steps:
            last = t.run_step()
            if t.is_main:
                t.metrics.write(last)
                bar.set_postfix({k: f"{last[k]:.3g}" for k in BAR_KEYS if k in last} | {"pairs": last["pairs_used"]})
                bar.update(1)
                for warning in (t.judge_noise.warning(), gap_watch.warning(last)):
                    if warning:
                        bar.write(f"oaif: warning: {warning}", file=sys.stderr)
            check_step(last, t.step, t.checkpoints.last_saved)
            check_failures(t)
            if signal_name := signals.requested(t.accelerator):
                raise Stopped(signal_name, t.step, save(t))
            if cfg.train.save_every and t.step % cfg.train.save_every == 0 and t.step < cfg.train.max_steps:
                save(t)
        if last:
            check_failures(t, end=True)
        final = save(t)
    except (KeyboardInterrupt, Stopped, Exception) as e:
        # saved already / must not be saved / cannot be written (the message names the checkpoint kept)
        if not isinstance(e, (AnnotatorError, TrainingError, NonFiniteError, CheckpointWriteError)):
            save_after_error(t, e)
        raise
    finally:
        signals.restore()
        bar.close()
        t.close()
    return {"final_checkpoint": str(final), "steps": t.step, "last": last,
            "skipped_inputs": dict(t.parts.prompts.skipped), "judge": t.judge_noise.summary(),
            "output_dir": str(cfg.train.output_dir), "main": t.is_main}


SUMMARY_KEYS = ("loss", "reward_accuracy", "logratio_margin", "kl", "response_length", "eos_rate",
                "judge_consistency", "time_step_s")


def summary_text(summary: dict) -> str:
    """The end of a run in words: the checkpoint, the last step, the judge's numbers, and what to run next."""
    last, out = summary["last"], summary["output_dir"]
    lines = [f"done: {summary['steps']} steps, checkpoint {summary['final_checkpoint']}",
             "last step: " + ", ".join(f"{k}={last[k]:.4g}" for k in SUMMARY_KEYS if k in last),
             f"metrics: {os.path.join(out, 'metrics.jsonl')}"]
    if summary.get("judge"):
        lines.append(f"judge: {summary['judge']}")
    lines += [f"plots: oaif plot {out}   (PNGs of every metric over the steps, in {os.path.join(out, 'plots')})",
              f"next: oaif eval --run {out}   (each checkpoint's win rate against the start model on held-out "
              f"prompts; add --annotator-config {os.path.join(out, 'config.yaml')} to judge with this run's judge)"]
    return "\n".join(lines)
