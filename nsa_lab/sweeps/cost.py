"""Attended tokens per query: the sparsity a variant buys, as a number a sweep can minimise.

For query position ``t`` (0-indexed, so ``t + 1`` positions are causally visible) the
count follows ``NSA_SPEC.md`` branch by branch, and the result is its mean over
``t = 0 .. seq_len - 1``:

- ``full``: ``t + 1`` keys.
- compression: the visible compressed tokens, ``floor((t + 1 - l) / d) + 1`` once
  ``t >= l - 1``, else 0. They are counted whenever ``cmp`` or ``slc`` is active, since
  selection scores every visible compressed key even when the cmp output is dropped.
- selection: with at most ``n`` visible blocks of ``l_sel``, all ``t + 1`` positions;
  otherwise the query's own (partial) block, ``t mod l_sel + 1`` positions, plus
  ``n - 1`` full blocks. That is exact with forced blocks (the default); without them
  it assumes the query's own block is among the chosen, the usual case.
- window: ``min(t + 1, w)``.

Branches attend separately (each has its own keys unless ``shared_kv``), so counts add.
``topk`` is counted as the selection branch alone, ``window`` as the window alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nsa_lab.attention import get_variant
from nsa_lab.attention.nsa import NSAAttention

_SELECTION_ONLY = ("topk",)
_WINDOW_ONLY = ("window",)
_DENSE = ("full",)


@dataclass(frozen=True)
class AttnShape:
    """The attention settings the count depends on (a run's ``attn.*`` config)."""

    name: str
    branches: tuple[str, ...]
    l: int
    d: int
    l_sel: int
    n: int
    w: int

    @classmethod
    def from_config(cls, attn: Any) -> AttnShape:
        """From ``cfg.attn`` or any mapping/object with the same fields."""
        get = attn.get if hasattr(attn, "get") else lambda k: getattr(attn, k)
        branches = get("branches")
        if isinstance(branches, str):  # as MLflow stores it: "cmp,slc,win"
            branches = [b for b in branches.split(",") if b]
        return cls(
            name=str(get("name")),
            branches=tuple(branches),
            **{k: int(get(k)) for k in ("l", "d", "l_sel", "n", "w")},
        )


def attended_tokens_per_query(shape: AttnShape, seq_len: int) -> float:
    """Mean over query positions of the keys each query attends to (see module doc)."""
    positions = range(seq_len)
    return sum(_keys_at(shape, t) for t in positions) / seq_len


def _keys_at(shape: AttnShape, t: int) -> int:
    if shape.name in _DENSE:
        return t + 1
    if shape.name in _WINDOW_ONLY:
        return _window_keys(shape, t)
    if shape.name in _SELECTION_ONLY:
        return _selection_keys(shape, t)
    if get_variant(shape.name).build is not NSAAttention:
        raise ValueError(f"no attended-token count for attention variant {shape.name!r}")
    return _nsa_keys(shape, t)


def _nsa_keys(shape: AttnShape, t: int) -> int:
    branches, keys = shape.branches, 0
    if "cmp" in branches or "slc" in branches:
        keys += _compressed_keys(shape, t)
    if "slc" in branches:
        keys += _selection_keys(shape, t)
    if "win" in branches:
        keys += _window_keys(shape, t)
    return keys


def _compressed_keys(shape: AttnShape, t: int) -> int:
    return (t + 1 - shape.l) // shape.d + 1 if t >= shape.l - 1 else 0


def _selection_keys(shape: AttnShape, t: int) -> int:
    visible_blocks = t // shape.l_sel + 1
    if visible_blocks <= shape.n:
        return t + 1
    return t % shape.l_sel + 1 + (shape.n - 1) * shape.l_sel


def _window_keys(shape: AttnShape, t: int) -> int:
    return min(t + 1, shape.w)


def config_attended_tokens(cfg: Any) -> float:
    """:func:`attended_tokens_per_query` of a resolved config at its ``data.seq_len``."""
    return attended_tokens_per_query(AttnShape.from_config(cfg.attn), cfg.data.seq_len)
