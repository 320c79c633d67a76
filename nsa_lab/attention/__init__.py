"""Attention variants, selected by name through the registry.

Importing this package imports every variant module, and each registers itself.
"""

from nsa_lab.attention import full, nsa, topk, window  # noqa: F401  (self-registration)
from nsa_lab.attention.registry import Variant, build_attention, get_variant, list_variants

__all__ = ["Variant", "build_attention", "get_variant", "list_variants"]
