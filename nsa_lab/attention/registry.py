"""The attention registry: every variant is one module that registers itself by name.

A variant is a factory ``build(model_cfg, attn_cfg) -> nn.Module`` plus the attention
defaults it implies (``nsa_no_cmp`` is NSA with ``branches=[slc, win]``). Those
defaults fill the config keys the user left unset, so a run's logged config always
says which branches it really used, and any other combination stays reachable
through overrides.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from nsa_lab.errors import ConfigError

Builder = Callable[[Any, Any], nn.Module]


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    build: Builder
    defaults: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, Variant] = {}


def register(name: str, description: str, build: Builder, **defaults: Any) -> Variant:
    """Register ``build`` under ``name``; ``defaults`` preset attn keys left as None."""
    if name in _REGISTRY:
        raise ValueError(f"attention variant {name!r} is registered twice")
    variant = Variant(name, description, build, dict(defaults))
    _REGISTRY[name] = variant
    return variant


def get_variant(name: str) -> Variant:
    if name not in _REGISTRY:
        raise ConfigError("attn.name", name, f"unknown variant; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def list_variants() -> list[Variant]:
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def build_attention(model_cfg: Any, attn_cfg: Any) -> nn.Module:
    """Build the attention layer named by ``attn_cfg.name`` (config already resolved)."""
    return get_variant(attn_cfg.name).build(model_cfg, attn_cfg)
