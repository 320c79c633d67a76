"""Sweeps: declarative Optuna studies over the config, each trial a child MLflow run.

``spec`` (schema, validation) -> ``plan`` (is anything valid? the budget) -> ``study``
(storage, resume, claiming trials) -> ``trial`` (check, train, score) -> ``tracking``
(parent/child runs, study artifacts); ``runner`` drives it and ``report`` compares runs.
``cost`` counts attended tokens per query, a derived objective.
"""
