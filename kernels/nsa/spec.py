"""What every NSA implementation shares: hyper-parameters, head layout, gate mixing.

Only conventions live here, no masking or selection logic: the reference
(:mod:`.naive`) and the fast implementation (:mod:`.torch_ops`) each derive those
from ``docs/nsa.md`` on their own, so that comparing them actually tests something.

Conventions:
- Tensors are ``[B, T, heads, dim]``; compressed keys/values are ``[B, Nc, G, dim]``.
- GQA: query head ``h`` belongs to key/value group ``h // (H // G)`` (the layout of
  ``repeat_interleave`` and of ``scaled_dot_product_attention(enable_gqa=True)``).
- Gates are ``[B, T, H, len(branches)]``; column ``c`` weighs branch ``branches[c]``.
- The softmax scale defaults to ``1 / sqrt(d_k)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

BRANCHES = ("cmp", "slc", "win")


@dataclass(frozen=True)
class NSAParams:
    """NSA hyper-parameters, named as in ``AttnConfig`` (``l_sel`` is the paper's ``l'``)."""

    l: int  # compression block length
    d: int  # compression stride
    l_sel: int  # selection block length
    n: int  # selected blocks per query, forced ones included
    w: int  # sliding-window length
    branches: tuple[str, ...] = BRANCHES
    force_init_local: bool = True

    @classmethod
    def from_attn_cfg(cls, attn_cfg: Any) -> NSAParams:
        return cls(
            l=attn_cfg.l,
            d=attn_cfg.d,
            l_sel=attn_cfg.l_sel,
            n=attn_cfg.n,
            w=attn_cfg.w,
            branches=tuple(attn_cfg.branches),
            force_init_local=attn_cfg.force_init_local,
        )

    @property
    def scores_selection(self) -> bool:
        """Whether the compressed keys are needed: for the cmp output or to score slc."""
        return "cmp" in self.branches or "slc" in self.branches


def softmax_scale(q: torch.Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale


def heads_per_group(q: torch.Tensor, k: torch.Tensor) -> int:
    """``H // G`` for ``q [B, T, H, D]`` and ``k [B, S, G, D]``; rejects a bad GQA split."""
    n_heads, n_groups = q.shape[2], k.shape[2]
    if n_heads % n_groups:
        raise ValueError(f"{n_heads} query heads do not split into {n_groups} kv groups")
    return n_heads // n_groups


def check_gates(gates: torch.Tensor, branches: tuple[str, ...]) -> None:
    """Gate column ``c`` belongs to ``branches[c]``: one column per branch, no more."""
    if gates.shape[-1] != len(branches):
        raise ValueError(f"gates have {gates.shape[-1]} columns for branches {branches}")


def combine_branches(
    outputs: Mapping[str, torch.Tensor], gates: torch.Tensor, branches: tuple[str, ...]
) -> torch.Tensor:
    """``o = sum_c g_c * o_c``: gate column ``c`` belongs to ``branches[c]``."""
    check_gates(gates, branches)
    terms = (gates[..., c, None] * outputs[name] for c, name in enumerate(branches))
    return sum(terms)


def run_branches(
    q: torch.Tensor,
    gates: torch.Tensor,
    params: NSAParams,
    *,
    compression: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    selection: Callable[..., torch.Tensor],
    window: Callable[..., torch.Tensor],
    kc: torch.Tensor | None,
    vc: torch.Tensor | None,
    k_slc: torch.Tensor | None,
    v_slc: torch.Tensor | None,
    k_win: torch.Tensor | None,
    v_win: torch.Tensor | None,
    combine: Callable[..., torch.Tensor] = combine_branches,
) -> torch.Tensor:
    """The branch wiring a fast implementation plugs its ops into.

    ``compression(q, kc, vc) -> (o, lse)`` runs first, because its log-sum-exp scores
    the selection: ``selection(q, kc, lse, k, v)`` gets ``lse=None`` when cmp is off and
    computes it itself. ``window(q, k, v)``. Outputs are mixed by the gates, through
    ``combine(outputs, gates, branches)`` (a fused kernel may replace the default).
    """
    outputs: dict[str, torch.Tensor] = {}
    lse = None
    if "cmp" in params.branches:
        outputs["cmp"], lse = compression(q, kc, vc)
    if "slc" in params.branches:
        outputs["slc"] = selection(q, kc, lse, k_slc, v_slc)
    if "win" in params.branches:
        outputs["win"] = window(q, k_win, v_win)
    return combine(outputs, gates, params.branches)


def kernel_dtype(q: torch.Tensor) -> torch.dtype:
    """The autocast dtype when autocast is on for ``q``'s device, else ``q``'s own."""
    if torch.is_autocast_enabled(q.device.type):
        return torch.get_autocast_dtype(q.device.type)
    return q.dtype
