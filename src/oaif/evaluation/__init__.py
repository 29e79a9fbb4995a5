"""Head-to-head evaluation: generate with two models (or a run's checkpoints), judge the pairs,
win rates with intervals (:mod:`~oaif.evaluation.evaluate`), and the report with its plots
(:mod:`~oaif.evaluation.report`)."""
