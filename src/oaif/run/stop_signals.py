"""Stop requests from the operating system: SIGTERM, and SIGUSR1 where the platform has it.

``timeout``, ``docker stop``, Slurm and Kubernetes end a job with SIGTERM (Slurm can send SIGUSR1
ahead of preemption). A first signal only sets a flag; the loop finishes the step it is in, asks
every process whether any of them was signalled (:meth:`StopSignals.requested`, one small
collective, so the processes agree on the step they stop after), saves a checkpoint together and
leaves with :class:`Stopped`. With one process a second signal stops at once: :class:`Stopped`
is raised where the loop is, and its error path saves the progress since the last checkpoint, as
for Ctrl-C. With several processes a launcher (and Slurm, to every process of a job step) may
deliver the signal twice, so there the second signal changes nothing: the step ends first.
"""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger("oaif")


class Stopped(BaseException):
    """A run stopped on a signal; ``checkpoint`` is where its progress was saved (None: not yet saved).

    A ``BaseException``, like ``KeyboardInterrupt``: raised at once by a second signal, it may land in
    code that turns an ``Exception`` into a failed judgment, and must go through it.
    """

    def __init__(self, signal_name: str, step: int | None = None, checkpoint=None):
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
        where = f" at step {step}" if step is not None else ""
        saved = f"; saved {checkpoint}, rerun with train.resume=true to continue" if checkpoint is not None else ""
        super().__init__(f"stopped by {signal_name}{where}{saved}")

    @property
    def exit_code(self) -> int:
        """128 + the signal's number, the shell's convention for a process ended by a signal."""
        return 128 + int(getattr(signal, self.signal_name, signal.SIGTERM))


def stop_signals() -> list[signal.Signals]:
    """The signals that ask a run to stop: SIGTERM, and SIGUSR1 where the platform has it."""
    return [s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s is not None]


def stop_during_setup() -> None:
    """Until a run installs :class:`StopSignals`, a stop signal ends the command at once with
    :class:`Stopped` (a one-line message and exit 128+signal, not a silent kill). Setup writes no
    progress that a stop could lose. Only possible in the main thread; elsewhere a no-op."""
    if threading.current_thread() is threading.main_thread():
        for s in stop_signals():
            signal.signal(s, _raise_stopped)


def _raise_stopped(signum: int, frame) -> None:
    raise Stopped(signal.Signals(signum).name)


class StopSignals:
    """Turns the stop signals into a flag (:meth:`install`, :meth:`restore`, or ``with``)."""

    def __init__(self, immediate_second: bool = True):
        self.received: str | None = None
        self.immediate_second = immediate_second
        self._previous: dict = {}

    def install(self) -> "StopSignals":
        """Handle the stop signals from now on (only possible in the main thread; elsewhere a no-op)."""
        if threading.current_thread() is threading.main_thread():
            for s in stop_signals():
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def restore(self) -> None:
        """Put the previous handlers back."""
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def __enter__(self) -> "StopSignals":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None and self.immediate_second:
            raise Stopped(name)
        if self.received is None:
            log.warning("%s received: saving a checkpoint after this step%s", name,
                        " (send it again to stop at once)" if self.immediate_second else "")
        self.received = self.received or name

    def requested(self, accelerator) -> str | None:
        """The signal any process received, the same on every process (each must call this)."""
        if accelerator.num_processes == 1:
            return self.received
        import torch

        mine = int(getattr(signal, self.received)) if self.received else 0
        codes = accelerator.gather(torch.tensor([mine], device=accelerator.device)).tolist()
        return signal.Signals(max(codes)).name if max(codes) else None
