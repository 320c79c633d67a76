"""Sweeps: declarative Optuna studies over the config, each trial a child MLflow run.

``spec`` (schema, validation) -> ``plan`` (is anything valid? the budget) -> ``study``
(storage, resume, budget, grid queue, heartbeats) -> ``trial`` (the objective: check,
train, score) -> ``tracking`` (parent/child runs, study artifacts); ``runner`` drives
``study.optimize`` in each worker and ``report`` compares runs. ``cost`` re-exports the
attended-tokens count of :mod:`nsa_lab.models.flops`, a derived objective.
"""
