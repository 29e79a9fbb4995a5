"""One training step of online AI feedback, as its parts.

* :mod:`~oaif.step.sampling`: K responses per prompt from the current policy (the transformers
  backends; :mod:`oaif.generation` puts every backend behind one interface).
* :mod:`~oaif.step.pairs`: which responses the judge compares, and the judged pairs oriented into
  training pairs (failures and ties masked and counted).
* :mod:`~oaif.step.logprobs`, :mod:`~oaif.step.losses`, :mod:`~oaif.step.update`: per-sequence
  log-probs of policy and reference, the direct alignment losses, the backward pass.
* :mod:`~oaif.step.actor`: steps 1-3 for one micro-batch (sample, annotate, build pairs) as one part.
* :mod:`~oaif.step.records`: the typed records handed from one part to the next.

:class:`oaif.trainer.Trainer` runs them in order; the run around the steps lives in :mod:`oaif.run`.
"""
