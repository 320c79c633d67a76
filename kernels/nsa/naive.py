"""A slow, literal NSA reference for tests: per-query loops and dense ``T x T`` masks.

Every rule is spelled the way ``docs/nsa.md`` states it (visibility tests, the
``sum_m sum_r`` overlap, forced blocks by their definition), independently of
:mod:`.torch_ops`, so that agreement between the two is evidence, not tautology.
Use float64: it is meant to be exact, not fast.
"""

from __future__ import annotations

import math

import torch

from nsa_lab.kernels.nsa.spec import NSAParams, combine_branches, heads_per_group, softmax_scale


def reference_cmp_probs(
    q: torch.Tensor, kc: torch.Tensor, l: int, d: int, scale: float | None = None
) -> torch.Tensor:
    """``p^cmp [B,T,H,Nc]``: softmax over the blocks each query sees, 0 elsewhere.

    A query that sees no block gets an all-zero row, so its cmp output is exactly 0.
    """
    b, t_len, h, _ = q.shape
    n_cmp = kc.shape[1]
    k_heads = kc.repeat_interleave(heads_per_group(q, kc), dim=2)
    rows = []
    for t in range(t_len):
        row = q.new_zeros(b, h, n_cmp)
        visible = [i for i in range(n_cmp) if i * d + l - 1 <= t]
        if visible:
            cols = torch.tensor(visible, device=q.device)
            logits = torch.einsum("bhd,bnhd->bhn", q[:, t], k_heads[:, cols])
            row = row.index_copy(-1, cols, torch.softmax(logits * softmax_scale(q, scale), -1))
        rows.append(row)
    return torch.stack(rows, dim=1)


def reference_compression(
    q: torch.Tensor,
    kc: torch.Tensor,
    vc: torch.Tensor,
    l: int,
    d: int,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``o^cmp [B,T,H,Dv]`` and the detached probabilities ``[B,T,H,Nc]`` used for scoring."""
    probs = reference_cmp_probs(q, kc, l, d, scale)
    v_heads = vc.repeat_interleave(heads_per_group(q, kc), dim=2)
    return torch.einsum("bthn,bnhd->bthd", probs, v_heads), probs.detach()


def reference_selection_scores(
    p_cmp: torch.Tensor, l: int, d: int, l_sel: int, n_groups: int
) -> torch.Tensor:
    """``p' [B,T,G,Nsel]``: ``p^slc[j] = sum_m sum_r p^cmp[j*l'/d + m - r]``, summed per group."""
    b, t_len, h, n_cmp = p_cmp.shape
    n_sel = math.ceil(t_len / l_sel)
    per_head = p_cmp.new_zeros(b, t_len, h, n_sel)
    for j in range(n_sel):
        for m in range(l_sel // d):
            for r in range(l // d):
                i = j * (l_sel // d) + m - r
                if 0 <= i < n_cmp:
                    per_head[..., j] += p_cmp[..., i]
    hpg = h // n_groups
    groups = [per_head[:, :, g * hpg : (g + 1) * hpg].sum(dim=2) for g in range(n_groups)]
    return torch.stack(groups, dim=2)


def reference_select_blocks(
    scores: torch.Tensor, n: int, l_sel: int, force_init_local: bool = True
) -> torch.Tensor:
    """Chosen block ids ``[B,T,G,n]`` in ascending order, padded with -1."""
    b_len, t_len, g_len, n_sel = scores.shape
    values = scores.tolist()
    out = torch.full((b_len, t_len, g_len, n), -1, dtype=torch.long)
    for b in range(b_len):
        for t in range(t_len):
            for g in range(g_len):
                chosen = _reference_choice(values[b][t][g], t, n, l_sel, n_sel, force_init_local)
                out[b, t, g, : len(chosen)] = torch.tensor(sorted(chosen), dtype=torch.long)
    return out.to(scores.device)


def _reference_choice(
    score: list[float], t: int, n: int, l_sel: int, n_sel: int, force_init_local: bool
) -> list[int]:
    visible = [j for j in range(n_sel) if j * l_sel <= t]
    if len(visible) <= n:
        return visible
    forced = []
    if force_init_local:
        holds_t = [j for j in visible if j * l_sel <= t < (j + 1) * l_sel]
        before_t = [j for j in visible if (j + 1) * l_sel <= t < (j + 2) * l_sel]
        forced = sorted({0, *holds_t, *before_t})
    rest = sorted((j for j in visible if j not in forced), key=lambda j: (-score[j], j))
    return forced + rest[: n - len(forced)]


def reference_selection_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    l_sel: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Dense attention whose mask admits, for query ``t``, the positions ``<= t`` of its blocks."""
    b_len, t_len, g_len, _ = indices.shape
    mask = torch.zeros(b_len, g_len, t_len, t_len, dtype=torch.bool, device=q.device)
    for b in range(b_len):
        for t in range(t_len):
            for g in range(g_len):
                for j in indices[b, t, g].tolist():
                    if j >= 0:
                        mask[b, g, t, j * l_sel : min((j + 1) * l_sel, t + 1)] = True
    return _dense_attention(q, k, v, mask, scale)


def reference_window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: int, scale: float | None = None
) -> torch.Tensor:
    """Dense attention of ``q_t`` over positions ``max(0, t-w+1) .. t``."""
    t_len = q.shape[1]
    mask = torch.zeros(1, 1, t_len, t_len, dtype=torch.bool, device=q.device)
    for t in range(t_len):
        mask[..., t, max(0, t - w + 1) : t + 1] = True
    return _dense_attention(q, k, v, mask, scale)


def nsa_reference(
    q: torch.Tensor,
    gates: torch.Tensor,
    params: NSAParams,
    *,
    kc: torch.Tensor | None = None,
    vc: torch.Tensor | None = None,
    k_slc: torch.Tensor | None = None,
    v_slc: torch.Tensor | None = None,
    k_win: torch.Tensor | None = None,
    v_win: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Reference for :func:`nsa_lab.kernels.nsa.torch_ops.nsa_attention` (same signature)."""
    outputs: dict[str, torch.Tensor] = {}
    branches = params.branches
    if "cmp" in branches:
        outputs["cmp"], p_cmp = reference_compression(q, kc, vc, params.l, params.d, scale)
    elif "slc" in branches:
        p_cmp = reference_cmp_probs(q, kc, params.l, params.d, scale).detach()
    if "slc" in branches:
        scores = reference_selection_scores(p_cmp, params.l, params.d, params.l_sel, kc.shape[2])
        indices = reference_select_blocks(scores, params.n, params.l_sel, params.force_init_local)
        outputs["slc"] = reference_selection_attention(
            q, k_slc, v_slc, indices, params.l_sel, scale
        )
    if "win" in branches:
        outputs["win"] = reference_window_attention(q, k_win, v_win, params.w, scale)
    return combine_branches(outputs, gates, branches)


def _dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float | None
) -> torch.Tensor:
    """Softmax attention with a per-group ``[B|1, G|1, T, T]`` mask; every row must see a key."""
    hpg = heads_per_group(q, k)
    if not mask.any(dim=-1).all():
        raise ValueError("a query sees no key")
    mask_heads = mask.repeat_interleave(hpg, dim=1) if mask.shape[1] > 1 else mask
    logits = torch.einsum("bthd,bshd->bhts", q, k.repeat_interleave(hpg, dim=2))
    logits = (logits * softmax_scale(q, scale)).masked_fill(~mask_heads, -math.inf)
    return torch.einsum("bhts,bshd->bthd", torch.softmax(logits, -1), v.repeat_interleave(hpg, 2))
