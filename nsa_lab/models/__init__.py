"""Language models built around a registry attention layer."""

from nsa_lab.models.transformer import GQATransformer

__all__ = ["GQATransformer"]
