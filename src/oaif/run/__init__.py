"""The run around the steps: everything a training run needs besides the step itself.

Building a run from its config (:mod:`~oaif.run.build`), the loop over steps with its progress bar
and every way a run stops (:mod:`~oaif.run.loop`), checkpoints, metrics and the audit log, and the
lifecycle guards that act at step boundaries: the run directory and its lock, stop signals, the
non-finite guard, the bf16 rounding watch, and what a resume may change.
"""
