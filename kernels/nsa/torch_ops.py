"""NSA in plain PyTorch: the implementation used for training until Triton kernels land.

Each op has the signature a Triton kernel will later take over. Nothing here builds a
``T x T`` matrix: compression works on ``[T, Nc]`` scores, and selection and window
attention walk over chunks of ``QUERY_CHUNK`` queries, each attending its ``[chunk, keys]``
boolean mask through ``F.scaled_dot_product_attention``. Memory is ``O(T * chunk)``;
compute is ``O(T^2)`` like dense attention, which is fine at the lengths trained on CPU
(sparsity pays off in the Triton kernels). Where a branch provably equals causal
attention (every query selects all its blocks, or the window spans the sequence), it
runs as fused causal attention instead.

GQA is handled without copying keys: the ``H // G`` query heads of a group are stacked
along the query axis, so each group attends its own keys once.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F

from nsa_lab.kernels.nsa.spec import NSAParams, heads_per_group, run_branches, softmax_scale

# Queries per chunk in selection/window attention: bounds the mask at [chunk, T].
QUERY_CHUNK = 256

# Diagnostics only (see preferring_blocks): blocks ranked right after the forced ones,
# from a query position on. None: the spec's selection, unchanged.
_PREFERRED: ContextVar[tuple[tuple[int, ...], int] | None] = ContextVar(
    "preferred_blocks", default=None
)


def compression_attention(
    q: torch.Tensor,
    kc: torch.Tensor,
    vc: torch.Tensor,
    l: int,
    d: int,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over compressed blocks: ``q [B,T,H,Dk]``, ``kc [B,Nc,G,Dk]``, ``vc [B,Nc,G,Dv]``.

    Returns ``o_cmp [B,T,H,Dv]`` and the detached (at least float32) log-sum-exp ``[B,T,H]`` that
    :func:`selection_scores` needs to rebuild the probabilities. Queries that see no
    block get exactly 0 (their lse is meaningless and is masked by the scorer).
    """
    logits, visible = _compression_logits(q, kc, l, d, scale)
    probs = torch.softmax(logits, dim=-1).to(vc.dtype)
    o = torch.einsum("bghtn,bngd->btghd", probs, vc).reshape(*q.shape[:3], vc.shape[-1])
    sees_a_block = visible.any(dim=-1)[:, None, None]  # [T, 1, 1]
    return o * sees_a_block, _lse(logits, heads_per_group(q, kc))


def compression_lse(
    q: torch.Tensor, kc: torch.Tensor, l: int, d: int, scale: float | None = None
) -> torch.Tensor:
    """Only the log-sum-exp of :func:`compression_attention`: scoring without the cmp output."""
    with torch.no_grad():
        logits, _ = _compression_logits(q, kc, l, d, scale)
        return _lse(logits, heads_per_group(q, kc))


def selection_scores(
    q: torch.Tensor,
    kc: torch.Tensor,
    lse: torch.Tensor,
    l: int,
    d: int,
    l_sel: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Selection-block importance ``[B,T,G,Nsel]`` (no gradient: it only feeds a top-n).

    The cmp probabilities are summed over each group's heads first (the mapping is
    linear) and then spread onto selection blocks by the spec's segment-overlap rule,
    expressed as a ``[Nc, Nsel]`` matrix of overlap counts.
    """
    with torch.no_grad():
        logits, visible = _compression_logits(q, kc, l, d, scale)
        b, t, h = lse.shape
        lse_grouped = lse.reshape(b, t, kc.shape[2], h // kc.shape[2]).permute(0, 2, 3, 1)
        probs = torch.exp(logits - lse_grouped[..., None]).masked_fill(~visible, 0.0)
        overlap = overlap_matrix(kc.shape[1], math.ceil(t / l_sel), l, d, l_sel, probs)
        return (probs.sum(dim=2) @ overlap).permute(0, 2, 1, 3)


def select_blocks(
    scores: torch.Tensor, n: int, l_sel: int, force_init_local: bool = True
) -> torch.Tensor:
    """Top-``n`` visible selection blocks per query and group: ``[B,T,G,Nsel] -> [B,T,G,n]``.

    Forced blocks (block 0, the block holding ``t`` and the one before) rank first;
    the rest rank by score, ties to the lower index (stable sort). Slots beyond the
    visible blocks hold -1. Returns int64 indices, in rank order.
    """
    t_len, n_sel = scores.shape[1], scores.shape[-1]
    position = torch.arange(t_len, device=scores.device)
    current = (position // l_sel)[:, None, None]  # [T, 1, 1], broadcasts over G and Nsel
    block = torch.arange(n_sel, device=scores.device)
    ranked = scores.detach().masked_fill(block > current, -math.inf)
    if force_init_local:
        forced = (block == 0) | (block == current) | (block == current - 1)
        ranked = ranked.masked_fill(forced, math.inf)
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices[..., :n]
    order = order.masked_fill(torch.gather(ranked, -1, order) == -math.inf, -1)
    return F.pad(order, (0, n - order.shape[-1]), value=-1)


def selection_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    l_sel: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of each query over its group's selected blocks, causal inside its own block.

    ``q [B,T,H,Dk]``, ``k [B,T,G,Dk]``, ``v [B,T,G,Dv]``, ``indices [B,T,G,n]`` (-1 = none)
    -> ``[B,T,H,Dv]``.
    """
    outputs = []
    for start, end in query_chunks(q.shape[1]):
        n_blocks = math.ceil(end / l_sel)
        idx = indices[:, start:end]
        chosen = torch.zeros(*idx.shape[:3], n_blocks + 1, dtype=torch.bool, device=q.device)
        chosen.scatter_(-1, idx.masked_fill(idx < 0, n_blocks), True)
        key_block = torch.arange(end, device=q.device) // l_sel
        mask = chosen[..., key_block] & causal_mask(start, end, 0, q.device)[None, :, None, :]
        outputs.append(_grouped_attention(q[:, start:end], k[:, :end], v[:, :end], mask, scale))
    return torch.cat(outputs, dim=1)


def sliding_window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: int, scale: float | None = None
) -> torch.Tensor:
    """Attention of ``q_t`` over positions ``max(0, t-w+1) .. t``: ``[B,T,H,Dk] -> [B,T,H,Dv]``.

    A window at least as long as the sequence is plain causal attention, computed as such.
    """
    if w >= q.shape[1]:
        return causal_attention(q, k, v, scale)
    outputs = []
    for start, end in query_chunks(q.shape[1]):
        first_key = max(0, start - w + 1)
        queries = torch.arange(start, end, device=q.device)[:, None]
        distance = queries - torch.arange(first_key, end, device=q.device)  # [chunk, keys]
        mask = ((distance >= 0) & (distance < w))[None, :, None, :]
        outputs.append(
            _grouped_attention(
                q[:, start:end], k[:, first_key:end], v[:, first_key:end], mask, scale
            )
        )
    return torch.cat(outputs, dim=1)


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Dense causal GQA attention ``[B,T,H,Dk] -> [B,T,H,Dv]`` (fused SDPA, no mask tensor)."""
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        is_causal=True,
        scale=softmax_scale(q, scale),
        enable_gqa=True,
    )
    return o.transpose(1, 2)


def nsa_attention(
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
    """Gated NSA output ``[B,T,H,Dv]`` over the branches in ``params.branches``.

    Pass the tensors the active branches need: ``kc`` whenever cmp or slc is active
    (cmp attends it, slc is scored by it), ``vc`` for cmp, ``k_slc/v_slc`` and
    ``k_win/v_win`` for their branches (the same tensors when K/V are shared).
    """
    return run_branches(
        q,
        gates,
        params,
        compression=lambda q, kc, vc: compression_attention(q, kc, vc, params.l, params.d, scale),
        selection=lambda q, kc, lse, k, v: _selection_branch(q, kc, lse, k, v, params, scale),
        window=lambda q, k, v: sliding_window_attention(q, k, v, params.w, scale),
        kc=kc,
        vc=vc,
        k_slc=k_slc,
        v_slc=v_slc,
        k_win=k_win,
        v_win=v_win,
    )


def query_chunks(t_len: int) -> list[tuple[int, int]]:
    """``[start, end)`` ranges of at most ``QUERY_CHUNK`` queries covering ``0 .. t_len``."""
    return [(s, min(s + QUERY_CHUNK, t_len)) for s in range(0, t_len, QUERY_CHUNK)]


def causal_mask(start: int, end: int, first_key: int, device: torch.device) -> torch.Tensor:
    """``[end-start, end-first_key]``: query ``start+i`` sees key ``first_key+j`` iff not later."""
    queries = torch.arange(start, end, device=device)[:, None]
    return torch.arange(first_key, end, device=device)[None, :] <= queries


def _selection_branch(
    q: torch.Tensor,
    kc: torch.Tensor,
    lse: torch.Tensor | None,
    k: torch.Tensor,
    v: torch.Tensor,
    params: NSAParams,
    scale: float | None,
) -> torch.Tensor:
    """Score, pick and attend; ``lse`` comes from the cmp branch when it ran.

    When there are at most ``n`` selection blocks, every query sees at most ``n`` and so
    selects all it sees: the branch is exactly causal attention, computed as such.
    """
    if params.n >= math.ceil(q.shape[1] / params.l_sel):
        return causal_attention(q, k, v, scale)
    indices = selected_blocks(q, kc, params, scale, lse)
    return selection_attention(q, k, v, indices, params.l_sel, scale)


def selected_blocks(
    q: torch.Tensor,
    kc: torch.Tensor,
    params: NSAParams,
    scale: float | None = None,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """The blocks each query's selection attends, ``[B,T,G,n]``: score, then top-``n``.

    ``lse`` is the cmp branch's when it ran (recomputed otherwise). Inside
    :func:`preferring_blocks` the preferred blocks outrank every scored block.
    """
    if lse is None:
        lse = compression_lse(q, kc, params.l, params.d, scale)
    scores = selection_scores(q, kc, lse, params.l, params.d, params.l_sel, scale)
    preferred = _PREFERRED.get()
    if preferred is not None:
        blocks, first_query = preferred
        visible = [b for b in blocks if b < scores.shape[-1]]
        scores[:, first_query:, :, visible] = torch.finfo(scores.dtype).max
    return select_blocks(scores, params.n, params.l_sel, params.force_init_local)


@contextmanager
def preferring_blocks(blocks: Sequence[int], first_query: int) -> Iterator[None]:
    """Oracle selection, for diagnostics: queries from ``first_query`` on pick ``blocks``.

    The blocks rank right after the forced ones (ahead of every scored block), so the
    question "would the model answer if selection found the needle?" can be asked of a
    trained model. Only this module's PyTorch op honours it (the Triton kernels select
    on their own): run the model with ``attn.impl=torch`` inside it.
    """
    token = _PREFERRED.set((tuple(blocks), first_query))
    try:
        yield
    finally:
        _PREFERRED.reset(token)


def _compression_logits(
    q: torch.Tensor, kc: torch.Tensor, l: int, d: int, scale: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[B,G,H/G,T,Nc]``, at least float32, hidden blocks at the dtype minimum.

    Hidden blocks get exactly zero probability in any row that sees a block. The finite
    fill (not -inf) keeps rows that see none NaN-free in the softmax and its backward;
    callers zero those rows using the returned ``[T, Nc]`` visibility mask.
    """
    b, t, h, dk = q.shape
    n_groups = kc.shape[2]
    q_grouped = (q * softmax_scale(q, scale)).reshape(b, t, n_groups, h // n_groups, dk)
    logits = torch.einsum("btghd,bngd->bghtn", q_grouped, kc)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    last_position = torch.arange(kc.shape[1], device=q.device) * d + l - 1
    visible = last_position[None, :] <= torch.arange(t, device=q.device)[:, None]
    return logits.masked_fill(~visible, torch.finfo(logits.dtype).min), visible


def _lse(logits: torch.Tensor, hpg: int) -> torch.Tensor:
    """``[B,G,H/G,T,Nc]`` logits -> detached ``[B,T,H]`` log-sum-exp (head order g*hpg + i)."""
    lse = torch.logsumexp(logits.detach(), dim=-1)
    return lse.permute(0, 3, 1, 2).flatten(2)


def overlap_matrix(
    n_cmp: int, n_sel: int, l: int, d: int, l_sel: int, like: torch.Tensor
) -> torch.Tensor:
    """``[Nc, Nsel]``: how many stride-``d`` segments cmp block ``i`` shares with sel block ``j``.

    Block ``i`` holds segments ``[i, i + l/d)``, block ``j`` holds ``[j*l_sel/d, (j+1)*l_sel/d)``;
    the spec's double sum over ``m, r`` counts exactly those shared segments.
    """
    cmp_first = torch.arange(n_cmp, device=like.device)[:, None]
    sel_first = torch.arange(n_sel, device=like.device)[None, :] * (l_sel // d)
    lo = torch.maximum(cmp_first, sel_first)
    hi = torch.minimum(cmp_first + l // d, sel_first + l_sel // d)
    return (hi - lo).clamp(min=0).to(like.dtype)


def _grouped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float | None
) -> torch.Tensor:
    """Masked GQA attention: ``q [B,C,H,Dk]``, ``k/v [B,S,G,D]``, ``mask [B|1,C,G|1,S]``.

    The group's heads are stacked along the query axis (``[B, G, H/G * C, D]``), so the
    mask is repeated per head instead of keys being copied per head.
    """
    b, c, h, dk = q.shape
    n_groups, hpg = k.shape[2], heads_per_group(q, k)
    q_stacked = q.reshape(b, c, n_groups, hpg, dk).permute(0, 2, 3, 1, 4).flatten(2, 3)
    mask = mask.permute(0, 2, 1, 3)[:, :, None].expand(-1, n_groups, hpg, -1, -1).flatten(2, 3)
    k, v = k.transpose(1, 2), v.transpose(1, 2)
    scale = softmax_scale(q, scale)
    o = F.scaled_dot_product_attention(q_stacked, k, v, attn_mask=mask, scale=scale)
    return o.unflatten(2, (hpg, c)).permute(0, 3, 1, 2, 4).flatten(2, 3)
