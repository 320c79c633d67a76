"""Attended tokens per query, the cost a sweep can minimise: a re-export.

The count lives in :mod:`nsa_lab.models.flops` (training's FLOPs per token use it too),
and the sweep code imports it from there; this name stays only for the tests and docs
outside the package that still cite ``nsa_lab/sweeps/cost.py``.
"""

from nsa_lab.models.flops import AttnShape, attended_tokens_per_query, config_attended_tokens

__all__ = ["AttnShape", "attended_tokens_per_query", "config_attended_tokens"]
