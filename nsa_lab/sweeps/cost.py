"""Attended tokens per query, the cost a sweep can minimise.

The count is not sweep-only (training's FLOPs per token use it too), so it lives in
:mod:`nsa_lab.models.flops`; sweeps import it from here by their own name.
"""

from nsa_lab.models.flops import AttnShape, attended_tokens_per_query, config_attended_tokens

__all__ = ["AttnShape", "attended_tokens_per_query", "config_attended_tokens"]
