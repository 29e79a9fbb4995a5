"""Head-to-head evaluation: generate with two models (or a run's checkpoints) with the same settings
(:mod:`~oaif.evaluation.responses`), judge the pairs and compute win rates with intervals
(:mod:`~oaif.evaluation.judging`), both modes run by :mod:`~oaif.evaluation.evaluate`, and the
report (:mod:`~oaif.evaluation.report`) with its plots (:mod:`~oaif.evaluation.plots`)."""
