"""Triton kernels for NSA's selection branch: block scoring, top-n, and group-centric attention.

Same functions as ``torch_ops.selection_scores`` + ``select_blocks`` and
``torch_ops.selection_attention`` (see ``docs/nsa.md``), built so that nothing of size
``T x T`` or ``T x Nc`` ever reaches memory:

- :func:`select_blocks_triton` walks the queries in chunks. Per chunk, a score kernel
  recomputes the compression probabilities from the cmp log-sum-exp tile by tile, sums
  them over the group's heads and maps them onto selection blocks with an on-the-fly
  overlap-count matrix (a ``tl.dot``); only the ``[B, G, chunk, Nsel]`` scores are
  stored. A top-n kernel then picks each row's blocks (forced blocks first, ties to the
  lower index).
- :func:`selection_attention_triton` is the paper's group-centric kernel: one program
  per (tile of consecutive query positions, batch, kv group) holds all the group's query
  heads of those positions and loads each K/V block they selected once for all of them.
  A tile holds ``16 // next_pow2(heads per group)`` positions (at least 1): with fewer
  than 16 heads per group one position would fill only a few of the 16 rows a tensor-core
  MMA needs, so neighbouring positions fill the rest. Neighbouring positions' selections
  overlap (the forced first and local blocks, and the blocks their similar queries
  score high), so the program walks the union of the tile's selections, each distinct
  block once, and each row attends a block only if its own position chose it. A tile
  of one position (16 or more heads per group) walks its own choices, from registers. Its
  backward computes dQ on the same grid and the same union, and dK/dV from an inverse
  index (which queries chose block ``j``), one program per block and chunk of its
  queries, so the block's K/V are loaded once per program and its gradient leaves by
  one atomic add per element.

All softmax work is in base 2 with the scale folded into one multiplier, and
accumulates in float32 whatever the input dtype; float32 inputs take true fp32 products
(:func:`~nsa_lab.kernels.nsa.triton_tuning.dot_precision`). Head and block dimensions
are padded to powers of two (at least 16, as ``tl.dot`` needs) and masked.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import triton
import triton.language as tl

from nsa_lab.kernels.nsa.spec import heads_per_group, softmax_scale
from nsa_lab.kernels.nsa.triton_range_attention import gate_args
from nsa_lab.kernels.nsa.triton_tuning import autotune, dot_precision

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * LOG2E)
_LOG2E_K = tl.constexpr(LOG2E)  # the same, readable inside kernels

# Score kernel: selection blocks per step (the N of the overlap dot, so at least 16). A
# step covers SCORE_SEL_BLOCKS * l_sel / d compressed blocks.
SCORE_SEL_BLOCKS = 16
# Autotune candidates ((tile sizes), num_warps, num_stages) on a GPU, and the one the
# interpreter runs. Selection attention is bound by reading the K/V rows of the union of
# a tile's selected blocks from L2: the candidates vary how many loads are in flight.
_SCORE_CANDIDATES = [({"BLOCK_M": 64}, 4, 2), ({"BLOCK_M": 128}, 8, 2), ({"BLOCK_M": 64}, 8, 2)]
_ATTENTION_CANDIDATES = [({}, 4, 2), ({}, 4, 3), ({}, 8, 2), ({}, 2, 3)]
# Head dims up to 64: the picks on an H100 (2026-11-27, 8 heads in 2 groups, 8k tokens).
_SMALL_HEAD_SCORE = [({"BLOCK_M": 64}, 4, 2)]
_SMALL_HEAD_ATTENTION = [({}, 4, 2), ({}, 2, 3)]
_INTERPRETER_SCORE, _INTERPRETER_ATTENTION = ({"BLOCK_M": 16}, 4, 1), ({}, 4, 1)
_ATTENTION_KEY = ["hpg", "dk", "dv"]
# dK/dV kernel: (query, head) rows per inner step (ROWS) and launch options. At head dim
# 128, sm_90 compile reports show every 64-row candidate spilling registers (96 B to
# 11 KB of stack); 32 rows with 8 warps and 16 rows with 4 warps fit. Small heads keep
# the H100 pick of 2026-11-27 (64 rows). The interpreter takes 16 rows, fewer than the
# 32 heads of a test's group, to exercise a step of one position.
_DKDV_CANDIDATES = [
    ({"ROWS": 64}, 4, 2),
    ({"ROWS": 64}, 8, 2),
    ({"ROWS": 32}, 8, 2),
    ({"ROWS": 32}, 4, 2),
    ({"ROWS": 16}, 4, 2),
    ({"ROWS": 16}, 4, 3),
]
_SMALL_HEAD_DKDV = [({"ROWS": 64}, 4, 2)]
_INTERPRETER_DKDV = ({"ROWS": 16}, 4, 1)
# Forward and dQ kernels: (position, head) rows per program, the M of every tl.dot. Fewer
# heads per group than this are made up with neighbouring positions.
MMA_ROWS = 16
# Top-n kernel: scores held per program (rows x padded Nsel).
TOP_N_TILE_ELEMENTS = 4096
# dK/dV kernel: queries per program. Block 0 is chosen by every query, so its list is
# split into pieces of at most this many queries.
DKDV_MAX_QUERIES = 256


def select_blocks_triton(
    q: torch.Tensor,
    kc: torch.Tensor,
    lse: torch.Tensor,
    *,
    l: int,
    d: int,
    l_sel: int,
    n: int,
    force_init_local: bool,
    scale: float | None = None,
    query_chunk: int = 8192,
) -> torch.Tensor:
    """Top-``n`` selection blocks per query and group: int32 ``[B, T, G, n]``, -1 padded.

    ``q [B,T,H,Dk]``, ``kc [B,Nc,G,Dk]`` and the cmp log-sum-exp ``lse [B,T,H]`` (natural
    log; any value, ``-inf`` included, for queries that see no compressed block). Same
    choice as ``select_blocks(selection_scores(...))`` and the same rank order (forced
    blocks first, then by score, ties to the lower index). Scores live only for
    ``query_chunk`` queries at a time: ``B * G * query_chunk * Nsel`` float32.
    """
    if l % d or l_sel % d or l > l_sel:
        raise ValueError(f"need d | l, d | l_sel and l <= l_sel; got l={l}, d={d}, l_sel={l_sel}")
    heads_per_group(q, kc)  # rejects a bad GQA split before any launch
    scale = softmax_scale(q, scale)
    return _select_blocks_op(q, kc, lse, l, d, l_sel, n, force_init_local, scale, query_chunk)


@torch.library.custom_op("nsa_lab::select_blocks", mutates_args=())
def _select_blocks_op(
    q: torch.Tensor,
    kc: torch.Tensor,
    lse: torch.Tensor,
    l: int,
    d: int,
    l_sel: int,
    n: int,
    force_init_local: bool,
    scale: float,
    query_chunk: int,
) -> torch.Tensor:
    """:func:`select_blocks_triton` as a custom op (see the selection attention's below)."""
    b, t_len, _, _ = q.shape
    n_groups = kc.shape[2]
    out = torch.empty(b, t_len, n_groups, n, dtype=torch.int32, device=q.device)
    chunk = max(1, min(query_chunk, t_len))
    scores = torch.empty(
        b, n_groups, chunk, math.ceil(t_len / l_sel), dtype=torch.float32, device=q.device
    )
    for start in range(0, t_len, chunk):
        end = min(start + chunk, t_len)
        rows = scores[:, :, : end - start, : math.ceil(end / l_sel)]
        _score_chunk(q, kc, lse, rows, start, l=l, d=d, l_sel=l_sel, scale=scale)
        _top_n(rows, out, start, n=n, l_sel=l_sel, force_init_local=force_init_local)
    return out


@_select_blocks_op.register_fake
def _select_blocks_fake(
    q: torch.Tensor, kc: torch.Tensor, lse: torch.Tensor, *args: Any
) -> torch.Tensor:
    b, t_len, _, _ = q.shape
    n = args[3]
    return q.new_empty(b, t_len, kc.shape[2], n, dtype=torch.int32)


def selection_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    *,
    l_sel: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of each query over its group's selected blocks, causal inside its own block.

    ``q [B,T,H,Dk]``, ``k [B,T,G,Dk]``, ``v [B,T,G,Dv]``, ``indices [B,T,G,n]`` (int32 or
    int64, -1 = empty slot, blocks distinct within a row) -> ``[B,T,H,Dv]``, differentiable
    in ``q, k, v``.
    """
    heads_per_group(q, k)
    o, _, _ = _selection_attention_op(q, k, v, indices, l_sel, softmax_scale(q, scale))
    return o


def selection_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    *,
    l_sel: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(o, lse, tile_blocks)`` of :func:`selection_attention_triton`, without autograd:
    for a fused NSA backward, which hands ``lse`` and ``tile_blocks`` back to
    :func:`selection_attention_backward`."""
    heads_per_group(q, k)
    return _selection_attention_op(q, k, v, indices, l_sel, scale)


def selection_attention_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    tile_blocks: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    do: torch.Tensor,
    dq: torch.Tensor,
    *,
    l_sel: int,
    scale: float,
    gate: torch.Tensor | None = None,
    accumulate: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dk, dv)`` of the selection attention, and its ``dq`` into ``dq``.

    ``gate [B,T,H]`` (any strides) makes it the gradient of ``gate[..., None] * o`` from
    the ungated ``do``; ``accumulate`` adds ``dq`` to what ``dq`` holds (another
    branch's share) instead of overwriting it. See ``range_attention_backward``.
    """
    return _selection_attention_backward_op(
        q, k, v, indices, tile_blocks, o, lse, do, dq, l_sel, scale, gate, accumulate
    )


# --------------------------------------------------------------------------- scoring


def _score_chunk(
    q: torch.Tensor,
    kc: torch.Tensor,
    lse: torch.Tensor,
    scores: torch.Tensor,
    t_start: int,
    *,
    l: int,
    d: int,
    l_sel: int,
    scale: float,
) -> None:
    """Fill ``scores [B, G, rows, Nsel]`` for queries ``t_start ..`` (see :func:`_score_kernel`).

    Entries of blocks a query cannot see may be left unwritten: the top-n masks them.
    """
    b, n_groups, rows, n_sel = scores.shape
    n_cmp = kc.shape[1]
    if n_cmp == 0:  # no compressed block exists: every probability, hence every score, is 0
        scores.zero_()
        return
    block_c = triton.next_power_of_2(SCORE_SEL_BLOCKS * (l_sel // d))
    _score_kernel[lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), b * n_groups)](
        q, kc, lse, scores,
        t_start, rows, n_cmp, n_sel, n_groups, heads_per_group(q, kc), q.shape[3], scale,
        *q.stride(), *kc.stride(), *lse.stride(), *scores.stride(),
        L=l, D=d, L_SEL=l_sel, BLOCK_DK=_dim_block(q.shape[3]),
        BLOCK_S=SCORE_SEL_BLOCKS, BLOCK_C=block_c, PRECISION=dot_precision(q.dtype),
    )  # fmt: skip


@autotune(
    _SCORE_CANDIDATES,
    _INTERPRETER_SCORE,
    ["hpg", "dk"],
    small_head=_SMALL_HEAD_SCORE,
    head_dim_arg="dk",
)
@triton.jit
def _score_kernel(
    q_ptr, kc_ptr, lse_ptr, out_ptr,
    t_start, n_rows, n_cmp, n_sel, n_groups, hpg, dk, scale,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kg, stride_kd,
    stride_lb, stride_lt, stride_lh,
    stride_ob, stride_og, stride_ot, stride_oj,
    L: tl.constexpr, D: tl.constexpr, L_SEL: tl.constexpr, BLOCK_DK: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
):  # fmt: skip
    """Scores of ``BLOCK_M`` queries x one kv group, ``BLOCK_S`` selection blocks per step.

    Per step, one ``kc`` tile serves every head of the group: the heads' probabilities
    are summed into one ``[BLOCK_M, BLOCK_C]`` tile first, so the overlap mapping (a
    ``tl.dot`` with an on-the-fly overlap-count matrix, linear, hence after the head
    sum) runs once per step instead of once per head. Step ``s`` covers selection blocks
    ``[s*BLOCK_S, (s+1)*BLOCK_S)`` and the compressed blocks whose first segment lies in
    them; since ``l <= l_sel`` such a block overlaps at most one block further, the first
    one of step ``s+1``, which it reaches through ``carry``.
    """
    SEG_CMP: tl.constexpr = L // D  # segments per compressed block
    SEG_SEL: tl.constexpr = L_SEL // D  # segments per selection block
    CMP_PER_STEP: tl.constexpr = BLOCK_S * SEG_SEL
    pid_bg = tl.program_id(1)
    b = (pid_bg // n_groups).to(tl.int64)
    g = pid_bg % n_groups
    local = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = local < n_rows
    t = t_start + local
    q_rows = b * stride_qb + t.to(tl.int64) * stride_qt
    lse_rows = b * stride_lb + t.to(tl.int64) * stride_lt
    last = tl.minimum(t_start + (tl.program_id(0) + 1) * BLOCK_M, t_start + n_rows) - 1
    n_steps = (last // L_SEL) // BLOCK_S + 1
    c_off = tl.arange(0, BLOCK_C)
    s_off = tl.arange(0, BLOCK_S)
    carry = tl.zeros((BLOCK_M, BLOCK_S), dtype=tl.float32)
    for step in range(n_steps):
        cmp = step * CMP_PER_STEP + c_off
        cmp_ok = (c_off < CMP_PER_STEP) & (cmp < n_cmp)
        kc_off = b * stride_kb + cmp.to(tl.int64) * stride_kn + g * stride_kg
        kc = _load_rows(kc_ptr, kc_off, cmp_ok, dk, stride_kd, BLOCK_DK)
        keep = ((cmp * D + L - 1)[None, :] <= t[:, None]) & cmp_ok[None, :] & row_ok[:, None]
        p = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
        for head in range(g * hpg, (g + 1) * hpg):
            q = _load_rows(q_ptr, q_rows + head * stride_qh, row_ok, dk, stride_qd, BLOCK_DK)
            lse = tl.load(lse_ptr + lse_rows + head * stride_lh, mask=row_ok, other=0.0)
            logits = tl.dot(q, tl.trans(kc), input_precision=PRECISION)
            # Masked before exp2: lse of a row that sees no block may be -inf or huge.
            p += tl.exp2(tl.where(keep, logits * scale - lse[:, None], -float("inf")) * _LOG2E_K)
        # Shared segments of cmp block i ([i, i + SEG_CMP)) and sel block j.
        sel = step * BLOCK_S + s_off
        lo = tl.maximum(cmp[:, None], (sel * SEG_SEL)[None, :])
        hi = tl.minimum(cmp[:, None] + SEG_CMP, ((sel + 1) * SEG_SEL)[None, :])
        overlap = tl.maximum(hi - lo, 0).to(tl.float32)
        score = carry + tl.dot(p, overlap, input_precision="tf32x3")
        spill = tl.maximum(cmp + SEG_CMP - (step + 1) * CMP_PER_STEP, 0).to(tl.float32)
        carry = tl.where(s_off[None, :] == 0, tl.sum(p * spill[None, :], axis=1)[:, None], 0.0)
        tl.store(
            out_ptr + b * stride_ob + g * stride_og + local.to(tl.int64)[:, None] * stride_ot
            + sel[None, :] * stride_oj,
            score,
            mask=row_ok[:, None] & (sel < n_sel)[None, :],
        )  # fmt: skip


def _top_n(
    scores: torch.Tensor,
    out: torch.Tensor,
    t_start: int,
    *,
    n: int,
    l_sel: int,
    force_init_local: bool,
) -> None:
    """Write ``out[:, t_start : t_start + rows]`` from ``scores [B, G, rows, Nsel]``."""
    b, n_groups, rows, n_sel = scores.shape
    block_n = triton.next_power_of_2(n_sel)
    block_r = max(1, min(16, TOP_N_TILE_ELEMENTS // block_n))
    grid = (triton.cdiv(rows, block_r), b * n_groups)
    _top_n_kernel[grid](
        scores, out, t_start, rows, n_sel, n, n_groups,
        *scores.stride(), *out.stride(),
        L_SEL=l_sel, FORCE=force_init_local, BLOCK_R=block_r, BLOCK_N=block_n,
        num_warps=4 if block_n >= 512 else 2,
    )  # fmt: skip


@triton.jit
def _top_n_kernel(
    scores_ptr, out_ptr, t_start, n_rows, n_sel, n, n_groups,
    stride_sb, stride_sg, stride_st, stride_sj,
    stride_ob, stride_ot, stride_og, stride_on,
    L_SEL: tl.constexpr, FORCE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """``BLOCK_R`` rows of one (batch, group): ``n`` rounds of (max, lowest index, knock out).

    Invisible blocks are ``-inf`` and forced ones ``+inf``, so forced blocks come first
    and a round whose maximum is ``-inf`` has run out of visible blocks: it writes -1.
    """
    pid_bg = tl.program_id(1)
    b = (pid_bg // n_groups).to(tl.int64)
    g = pid_bg % n_groups
    local = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = local < n_rows
    current = (t_start + local) // L_SEL  # the block holding the query
    block = tl.arange(0, BLOCK_N)
    visible = (block[None, :] <= current[:, None]) & (block < n_sel)[None, :] & row_ok[:, None]
    x = tl.load(
        scores_ptr + b * stride_sb + g * stride_sg + local.to(tl.int64)[:, None] * stride_st
        + block[None, :] * stride_sj,
        mask=visible, other=-float("inf"),
    )  # fmt: skip
    if FORCE:
        forced = (block[None, :] == 0) | (block[None, :] == current[:, None])
        forced |= block[None, :] == current[:, None] - 1
        x = tl.where(forced & visible, float("inf"), x)
    out = out_ptr + b * stride_ob + (t_start + local).to(tl.int64) * stride_ot + g * stride_og
    for slot in range(n):
        best = tl.max(x, axis=1)
        pick = tl.min(tl.where(x == best[:, None], block[None, :], BLOCK_N), axis=1)
        tl.store(out + slot * stride_on, tl.where(best == -float("inf"), -1, pick), mask=row_ok)
        x = tl.where(block[None, :] == pick[:, None], -float("inf"), x)


# ------------------------------------------------------------------------- attention


# The kernels as PyTorch custom ops, so that torch.compile keeps each launch as one opaque
# node (see ``triton_range_attention``).
@torch.library.custom_op("nsa_lab::selection_attention", mutates_args=())
def _selection_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    l_sel: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(o, lse, tile_blocks)``: the output and what the backward reuses."""
    b, t_len, h, dk = q.shape
    n_groups, dv = k.shape[2], v.shape[3]
    o = torch.empty(b, t_len, h, dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(b, t_len, h, dtype=torch.float32, device=q.device)
    meta = _attention_meta(q, k, v, indices, l_sel)
    n_tiles = triton.cdiv(t_len, meta["QPP"])
    # Filled by the forward kernel (each tile's block union), read again by dQ's.
    tile_blocks = torch.empty(
        b, n_tiles, n_groups, _union_width(meta["QPP"], indices.shape[3]),
        dtype=torch.int32, device=q.device,
    )  # fmt: skip
    _selection_fwd_kernel[(n_tiles, b * n_groups)](
        q, k, v, indices, tile_blocks, o, lse,
        *q.stride(), *k.stride(), *v.stride(), *indices.stride(), *tile_blocks.stride(),
        *o.stride(), *lse.stride(),
        t_len, n_groups, h // n_groups, indices.shape[3], dk, dv, scale * LOG2E,
        **meta,
    )  # fmt: skip
    return o, lse, tile_blocks


@_selection_attention_op.register_fake
def _selection_attention_fake(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor, l_sel: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    b, t_len, h, _ = q.shape
    qpp = _positions_per_tile(heads_per_group(q, k))
    tiles, slots = triton.cdiv(t_len, qpp), _union_width(qpp, indices.shape[3])
    return (
        q.new_empty(b, t_len, h, v.shape[3]),
        q.new_empty(b, t_len, h, dtype=torch.float32),
        q.new_empty(b, tiles, k.shape[2], slots, dtype=torch.int32),
    )


@torch.library.custom_op("nsa_lab::selection_attention_backward", mutates_args=("dq",))
def _selection_attention_backward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    tile_blocks: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    do: torch.Tensor,
    dq: torch.Tensor,
    l_sel: int,
    scale: float,
    gate: torch.Tensor | None,
    accumulate: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    b, t_len, h, dk = q.shape
    n_groups, dv = k.shape[2], v.shape[3]
    hpg, n_sel = h // n_groups, math.ceil(t_len / l_sel)
    meta = _attention_meta(q, k, v, indices, l_sel)
    delta = torch.empty(b, t_len, h, dtype=torch.float32, device=q.device)
    gate_ptr, gate_strides = gate_args(gate, lse)
    _selection_dq_kernel[(tile_blocks.shape[1], b * n_groups)](
        q, k, v, indices, tile_blocks, o, do, lse, dq, delta, gate_ptr,
        *q.stride(), *k.stride(), *v.stride(), *indices.stride(), *tile_blocks.stride(),
        *o.stride(), *do.stride(), *lse.stride(), *dq.stride(), *gate_strides,
        t_len, n_groups, hpg, indices.shape[3], dk, dv, scale * LOG2E, scale,
        **meta, GATED=gate is not None, ACCUMULATE=accumulate,
    )  # fmt: skip
    dk_acc = torch.zeros(b, t_len, n_groups, dk, dtype=torch.float32, device=q.device)
    dv_acc = torch.zeros(b, t_len, n_groups, dv, dtype=torch.float32, device=q.device)
    items, positions = _queries_by_block(indices, n_sel, DKDV_MAX_QUERIES)
    if items.shape[0]:
        heads_pow2 = triton.next_power_of_2(hpg)
        _selection_dkdv_kernel[(items.shape[0],)](
            q, k, v, do, lse, delta, gate_ptr, dk_acc, dv_acc, items, positions,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *lse.stride(), *gate_strides,
            *dk_acc.stride(), *dv_acc.stride(),
            t_len, n_groups, n_sel, hpg, dk, dv, scale * LOG2E, scale,
            L_SEL=l_sel, HPP=heads_pow2,
            BLOCK_L=meta["BLOCK_L"], BLOCK_DK=meta["BLOCK_DK"], BLOCK_DV=meta["BLOCK_DV"],
            PRECISION=meta["PRECISION"], GATED=gate is not None,
        )  # fmt: skip
    return dk_acc.to(k.dtype), dv_acc.to(v.dtype)


@_selection_attention_backward_op.register_fake
def _selection_attention_backward_fake(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *_rest: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(k), torch.empty_like(v)


def _setup_backward(ctx: Any, inputs: tuple, output: tuple) -> None:
    q, k, v, indices, l_sel, scale = inputs
    o, lse, tile_blocks = output
    ctx.save_for_backward(q, k, v, indices, tile_blocks, o, lse)
    ctx.l_sel, ctx.scale = l_sel, scale
    ctx.mark_non_differentiable(lse, tile_blocks)


def _selection_attention_grad(ctx: Any, do: torch.Tensor, *_unused: Any) -> tuple:
    q, k, v, indices, tile_blocks, o, lse = ctx.saved_tensors
    dq = torch.empty_like(q)
    dk, dv = _selection_attention_backward_op(
        q, k, v, indices, tile_blocks, o, lse, do, dq, ctx.l_sel, ctx.scale, None, False
    )
    return dq, dk, dv, None, None, None


_selection_attention_op.register_autograd(_selection_attention_grad, setup_context=_setup_backward)


def _dim_block(dim: int) -> int:
    """A tile width for a head or block dimension: a power of two, at least 16 (``tl.dot``)."""
    return max(16, triton.next_power_of_2(dim))


def _positions_per_tile(hpg: int) -> int:
    """Query positions per forward/dQ program: enough to fill ``MMA_ROWS`` rows, at least 1."""
    return max(1, MMA_ROWS // triton.next_power_of_2(hpg))


def _union_width(qpp: int, n: int) -> int:
    """Entries of a tile's stored union: every slot of its positions; none for a tile of
    one position, whose union the kernels keep in registers (``_own_blocks``)."""
    return qpp * n if qpp > 1 else 0


def _attention_meta(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor, l_sel: int
) -> dict:
    """Compile-time sizes of the forward and dQ kernels (the dK/dV kernel shares some).

    A program's rows are ``QPP`` positions x ``HP`` head slots (padded heads masked), so
    ``QPP * HP = max(MMA_ROWS, HP)``; ``NP`` is the padded slot count of one position.
    """
    hpg = heads_per_group(q, k)
    return {
        "L_SEL": l_sel,
        "HP": triton.next_power_of_2(hpg),
        "QPP": _positions_per_tile(hpg),
        "NP": triton.next_power_of_2(indices.shape[3]),
        "BLOCK_L": _dim_block(l_sel),
        "BLOCK_DK": _dim_block(q.shape[3]),
        "BLOCK_DV": _dim_block(v.shape[3]),
        "PRECISION": dot_precision(q.dtype),
    }


def _queries_by_block(
    indices: torch.Tensor, n_sel: int, max_queries: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of ``indices [B,T,G,n]``: which query positions chose each (b, g, block).

    Returns ``positions`` (int32, the query positions grouped by bucket ``(b*G + g)*Nsel +
    j``, ascending within a bucket) and ``items [pieces, 3]`` (int64 ``bucket, start,
    end`` into ``positions``), each bucket's list cut into pieces of at most
    ``max_queries``. ``pieces`` is an upper bound known on the host (every full piece
    plus one partial piece per bucket), so nothing waits for the GPU: items past the real
    pieces are empty (``start == end``) and their programs do nothing.
    """
    b, t_len, n_groups, n = indices.shape
    n_buckets = b * n_groups * n_sel
    device = indices.device
    batch = torch.arange(b, device=device).view(b, 1, 1, 1)
    group = torch.arange(n_groups, device=device).view(1, 1, n_groups, 1)
    bucket = (batch * n_groups + group) * n_sel + indices.long()
    bucket = torch.where(indices >= 0, bucket, n_buckets).flatten()  # empty slots sort last
    sorted_bucket, entry = torch.sort(bucket, stable=True)
    positions = ((entry // (n_groups * n)) % t_len).to(torch.int32)
    # Bucket ends by binary search in the sorted list (torch.bincount on a GPU would read
    # the largest value back to size its output: a host synchronisation every step).
    buckets = torch.arange(n_buckets, device=device)
    ends = torch.searchsorted(sorted_bucket, buckets, right=True)
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    pieces = (counts + max_queries - 1) // max_queries
    piece_ends = pieces.cumsum(0)
    bound = indices.numel() // max_queries + n_buckets
    piece = torch.arange(bound, device=device)
    owner = torch.searchsorted(piece_ends, piece, right=True).clamp_max(n_buckets - 1)
    rank = piece - (piece_ends - pieces)[owner]
    starts = (ends - counts)[owner] + rank * max_queries
    stops = torch.minimum(starts + max_queries, ends[owner])
    starts = torch.minimum(starts, stops)  # pieces past the last real one: empty
    return torch.stack([owner, starts, stops], dim=1).contiguous(), positions


@triton.jit
def _load_rows(
    ptr, row_off, row_ok, n_dims, stride_d, BLOCK_D: tl.constexpr
):  # fmt: skip
    """``[rows, BLOCK_D]`` from row offsets (position and head strides applied), zero padded."""
    dims = tl.arange(0, BLOCK_D)
    return tl.load(
        ptr + row_off[:, None] + dims[None, :] * stride_d,
        mask=row_ok[:, None] & (dims < n_dims)[None, :], other=0.0,
    )  # fmt: skip


@triton.jit
def _store_rows(ptr, row_off, row_ok, value, n_dims, stride_d, BLOCK_D: tl.constexpr):
    """The inverse of :func:`_load_rows`, casting to the buffer's dtype."""
    dims = tl.arange(0, BLOCK_D)
    tl.store(
        ptr + row_off[:, None] + dims[None, :] * stride_d,
        value.to(ptr.dtype.element_ty),
        mask=row_ok[:, None] & (dims < n_dims)[None, :],
    )


@triton.jit
def _columns(ptr, n_dims, stride_d, BLOCK_D: tl.constexpr):
    """``[1, BLOCK_D]`` pointers along a head dimension and their mask, built once per program."""
    dims = tl.arange(0, BLOCK_D)
    return ptr + (dims * stride_d)[None, :], (dims < n_dims)[None, :]


@triton.jit
def _load_block(
    k_cols, v_cols, dk_ok, dv_ok, block, last, stride_kt, stride_vt,
    L_SEL: tl.constexpr, BLOCK_L: tl.constexpr,
):  # fmt: skip
    """K ``[BLOCK_L, BLOCK_DK]``, V, key mask and positions of selection block ``block``.

    ``k_cols``/``v_cols`` come from :func:`_columns` at the (batch, group) base. Keys past
    ``last`` (the causal limit, at most ``T - 1``) are masked and read as 0. ``block``
    is a real block (non-negative): callers skip empty slots.
    """
    key = tl.arange(0, BLOCK_L)
    pos = block.to(tl.int64) * L_SEL + key
    key_ok = (key < L_SEL) & (pos <= last)
    k = tl.load(k_cols + pos[:, None] * stride_kt, mask=key_ok[:, None] & dk_ok, other=0.0)
    v = tl.load(v_cols + pos[:, None] * stride_vt, mask=key_ok[:, None] & dv_ok, other=0.0)
    return k, v, key_ok, pos


@triton.jit
def _tile_rows(tile, g, t_len, hpg, HP: tl.constexpr, QPP: tl.constexpr):
    """Rows of a forward/dQ program: ``QPP`` positions x ``HP`` head slots, position-major.

    Returns each row's position ``t`` (int64), query head, and whether it is real (a head
    of the group at a position before ``t_len``), plus the tile's last real position.
    """
    row = tl.arange(0, QPP * HP)
    first = tile * QPP
    t = (first + row // HP).to(tl.int64)
    head = row % HP
    row_ok = (head < hpg) & (t < t_len)
    last = tl.minimum(first + QPP - 1, t_len - 1)
    return t, g * hpg + head, row_ok, last


@triton.jit
def _row_choices(idx_row, t, row_ok, n, stride_it, stride_in, NP: tl.constexpr):
    """``[rows, NP]`` int32: the blocks each row's position chose, -1 padded.

    ``idx_row`` points at the (batch, group) of ``indices``; rows that are not real read -1.
    """
    slot = tl.arange(0, NP)
    return tl.load(
        idx_row + t[:, None] * stride_it + slot[None, :] * stride_in,
        mask=row_ok[:, None] & (slot < n)[None, :], other=-1,
    ).to(tl.int32)  # fmt: skip


@triton.jit
def _write_union(
    idx_row, tile_row, tile, t_len, n, stride_it, stride_in, stride_te,
    QPP: tl.constexpr, NP: tl.constexpr,
):  # fmt: skip
    """Writes the tile's block union to ``tile_row`` and returns its size.

    The union is every block some position of the tile chose, once, in descending
    order, then -1 up to the row's ``QPP * n`` entries (positions past ``t_len`` choose
    nothing). Built here in registers (a bitonic sort of the tile's ``QPP * NP`` choices,
    then each entry that differs from its predecessor), not by two sorts of every
    tile's choices in PyTorch before the launch: those cost about as much GPU time as
    the scoring kernel, and a dozen launches per layer. The loop that follows reads the
    entries back from memory, as the dQ kernel reads them later.
    """
    pos = (tile * QPP + tl.arange(0, QPP)).to(tl.int64)
    slot = tl.arange(0, NP)
    chosen = tl.load(
        idx_row + pos[:, None] * stride_it + slot[None, :] * stride_in,
        mask=(pos < t_len)[:, None] & (slot < n)[None, :], other=-1,
    ).to(tl.int32)  # fmt: skip
    blocks = tl.sort(tl.reshape(chosen, (QPP * NP,)), descending=True)
    entry = tl.arange(0, QPP * NP)
    previous = tl.gather(blocks, tl.maximum(entry - 1, 0), 0)
    first = (blocks >= 0) & ((entry == 0) | (blocks != previous))
    size = tl.sum(first.to(tl.int32), 0)
    rank = tl.cumsum(first.to(tl.int32), 0) - 1
    tl.store(tile_row + rank * stride_te, blocks, mask=first)
    tl.store(tile_row + entry * stride_te, -1, mask=(entry >= size) & (entry < QPP * n))
    tl.debug_barrier()  # every thread's entries are written before any thread reads one
    return size


@triton.jit
def _union_size(tile_row, n_entries, stride_e, ENTRIES: tl.constexpr):
    """How many distinct blocks lead a tile's union row (its non-negative entries)."""
    entry = tl.arange(0, ENTRIES)
    blocks = tl.load(tile_row + entry * stride_e, mask=entry < n_entries, other=-1)
    return tl.sum((blocks >= 0).to(tl.int32))


@triton.jit
def _own_blocks(choices):
    """A one-position tile's union: the position's own choices (every row is one of its
    heads, the padded rows chose nothing), descending, -1 last, and how many there are.
    Kept in registers: at 16 or more heads per group (the paper's shape) a tile is one
    position, and storing its union and reading it back would buy nothing."""
    own = tl.sort(tl.max(choices, axis=0), descending=True)
    return own, tl.sum((own >= 0).to(tl.int32), 0)


@triton.jit
def _union_entry(own, tile_row, entry, stride_te, QPP: tl.constexpr, NP: tl.constexpr):
    """Entry ``entry`` of the tile's union: from registers for a one-position tile
    (:func:`_own_blocks`), else from the row the forward kernel wrote."""
    if QPP == 1:
        block = tl.max(tl.where(tl.arange(0, NP) == entry, own, -1), 0)
    else:
        block = tl.load(tile_row + entry * stride_te, cache_modifier=".cg")
    return block


@triton.jit
def _row_gates(gate_ptr, b, t, q_head, row_ok, stride_gb, stride_gt, stride_gh):
    """Each row's branch gate (float32), for the gated backward of ``g * o`` from the
    ungated ``do`` (see the range kernels' ``_row_gates``)."""
    gates = tl.load(
        gate_ptr + b * stride_gb + t * stride_gt + q_head * stride_gh, mask=row_ok, other=0.0
    )
    return gates.to(tl.float32)


@triton.jit
def _visible_keys(choices, block, key_ok, key_pos, t):
    """``[rows, BLOCK_L]``: which keys of ``block`` each row attends.

    A row sees a key if its own position chose the block (other positions of the tile
    may have brought it into the union), the key lies in the block and sequence, and
    the key is not later than the row's position.
    """
    chosen = tl.max((choices == block).to(tl.int32), axis=1) > 0
    return chosen[:, None] & key_ok[None, :] & (key_pos[None, :] <= t[:, None])


@autotune(
    _ATTENTION_CANDIDATES,
    _INTERPRETER_ATTENTION,
    _ATTENTION_KEY,
    small_head=_SMALL_HEAD_ATTENTION,
    head_dim_arg="dk",
)
@triton.jit
def _selection_fwd_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, tiles_ptr, o_ptr, lse_ptr,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kg, stride_kd,
    stride_vb, stride_vt, stride_vg, stride_vd,
    stride_ib, stride_it, stride_ig, stride_in,
    stride_tb, stride_tt, stride_tg, stride_te,
    stride_ob, stride_ot, stride_oh, stride_od,
    stride_lb, stride_lt, stride_lh,
    t_len, n_groups, hpg, n, dk, dv, qk_scale,
    L_SEL: tl.constexpr, HP: tl.constexpr, QPP: tl.constexpr, NP: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """One (tile of ``QPP`` positions, batch, group): its rows against the tile's block union.

    Each block some position of the tile chose is loaded once for all rows. Online
    softmax over the blocks; the running max starts finite so that a block a row does
    not see (not its choice, or causally masked) contributes exactly nothing instead of
    NaN, and a row that sees no key at all ends with ``o = 0``. Stores the base-2
    log-sum-exp (``-inf`` for such a row) for the backward.
    """
    tile = tl.program_id(0)
    pid_bg = tl.program_id(1)
    b = (pid_bg // n_groups).to(tl.int64)
    g = pid_bg % n_groups
    t, q_head, row_ok, last = _tile_rows(tile, g, t_len, hpg, HP, QPP)
    q_rows = b * stride_qb + t * stride_qt + q_head * stride_qh
    q = _load_rows(q_ptr, q_rows, row_ok, dk, stride_qd, BLOCK_DK)
    choices = _row_choices(
        idx_ptr + b * stride_ib + g * stride_ig, t, row_ok, n, stride_it, stride_in, NP
    )
    k_cols, dk_ok = _columns(k_ptr + b * stride_kb + g * stride_kg, dk, stride_kd, BLOCK_DK)
    v_cols, dv_ok = _columns(v_ptr + b * stride_vb + g * stride_vg, dv, stride_vd, BLOCK_DV)
    m_i = tl.full((QPP * HP,), -1.0e30, dtype=tl.float32)
    l_i = tl.zeros((QPP * HP,), dtype=tl.float32)
    acc = tl.zeros((QPP * HP, BLOCK_DV), dtype=tl.float32)
    tile_row = tiles_ptr + b * stride_tb + tile * stride_tt + g * stride_tg
    own, n_union = _own_blocks(choices)
    if QPP > 1:
        n_union = _write_union(
            idx_ptr + b * stride_ib + g * stride_ig, tile_row, tile, t_len, n,
            stride_it, stride_in, stride_te, QPP, NP,
        )  # fmt: skip
    for entry in range(n_union):
        block = _union_entry(own, tile_row, entry, stride_te, QPP, NP)
        k, v, key_ok, key_pos = _load_block(
            k_cols, v_cols, dk_ok, dv_ok, block, last, stride_kt, stride_vt, L_SEL, BLOCK_L
        )
        visible = _visible_keys(choices, block, key_ok, key_pos, t)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        qk = tl.where(visible, qk, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    has_keys = l_i > 0.0
    l_safe = tl.where(has_keys, l_i, 1.0)
    o_rows = b * stride_ob + t * stride_ot + q_head * stride_oh
    _store_rows(o_ptr, o_rows, row_ok, acc / l_safe[:, None], dv, stride_od, BLOCK_DV)
    lse = tl.where(has_keys, m_i + tl.log2(l_safe), -float("inf"))
    tl.store(lse_ptr + b * stride_lb + t * stride_lt + q_head * stride_lh, lse, mask=row_ok)


@autotune(
    _ATTENTION_CANDIDATES,
    _INTERPRETER_ATTENTION,
    _ATTENTION_KEY,
    small_head=_SMALL_HEAD_ATTENTION,
    head_dim_arg="dk",
    restore_value=["dq_ptr"],
)
@triton.jit
def _selection_dq_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, tiles_ptr, o_ptr, do_ptr, lse_ptr, dq_ptr, delta_ptr, gate_ptr,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kg, stride_kd,
    stride_vb, stride_vt, stride_vg, stride_vd,
    stride_ib, stride_it, stride_ig, stride_in,
    stride_tb, stride_tt, stride_tg, stride_te,
    stride_ob, stride_ot, stride_oh, stride_od,
    stride_dob, stride_dot, stride_doh, stride_dod,
    stride_lb, stride_lt, stride_lh,
    stride_dqb, stride_dqt, stride_dqh, stride_dqd,
    stride_gb, stride_gt, stride_gh,
    t_len, n_groups, hpg, n, dk, dv, qk_scale, scale,
    L_SEL: tl.constexpr, HP: tl.constexpr, QPP: tl.constexpr, NP: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr, GATED: tl.constexpr, ACCUMULATE: tl.constexpr,
):  # fmt: skip
    """dQ on the forward's grid and block union; also stores ``delta = rowsum(o * do)``.

    ``delta`` is for the dK/dV kernel; ``lse``/``delta`` share the ``[B, T, H]`` float32
    layout, so one set of strides serves both. A row that sees no key (``lse = -inf``)
    gets ``p = 0`` everywhere, hence ``dq = 0``. ``GATED``: the gradient of
    ``gate * o`` per row (``gate * dq``), and the stored ``delta`` is ``gate * delta``,
    what the dK/dV kernel needs with its ``do`` gated; ``ACCUMULATE``: adds to what
    ``dq`` holds.
    """
    tile = tl.program_id(0)
    pid_bg = tl.program_id(1)
    b = (pid_bg // n_groups).to(tl.int64)
    g = pid_bg % n_groups
    t, q_head, row_ok, last = _tile_rows(tile, g, t_len, hpg, HP, QPP)
    q = _load_rows(
        q_ptr, b * stride_qb + t * stride_qt + q_head * stride_qh, row_ok, dk, stride_qd, BLOCK_DK
    )
    o = _load_rows(
        o_ptr, b * stride_ob + t * stride_ot + q_head * stride_oh, row_ok, dv, stride_od, BLOCK_DV
    )
    do_rows = b * stride_dob + t * stride_dot + q_head * stride_doh
    do = _load_rows(do_ptr, do_rows, row_ok, dv, stride_dod, BLOCK_DV)
    row_stat = b * stride_lb + t * stride_lt + q_head * stride_lh
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    if GATED:
        gates = _row_gates(gate_ptr, b, t, q_head, row_ok, stride_gb, stride_gt, stride_gh)
        tl.store(delta_ptr + row_stat, delta * gates, mask=row_ok)
    else:
        tl.store(delta_ptr + row_stat, delta, mask=row_ok)
    lse = tl.load(lse_ptr + row_stat, mask=row_ok, other=0.0)
    choices = _row_choices(
        idx_ptr + b * stride_ib + g * stride_ig, t, row_ok, n, stride_it, stride_in, NP
    )
    k_cols, dk_ok = _columns(k_ptr + b * stride_kb + g * stride_kg, dk, stride_kd, BLOCK_DK)
    v_cols, dv_ok = _columns(v_ptr + b * stride_vb + g * stride_vg, dv, stride_vd, BLOCK_DV)
    dq = tl.zeros((QPP * HP, BLOCK_DK), dtype=tl.float32)
    tile_row = tiles_ptr + b * stride_tb + tile * stride_tt + g * stride_tg
    own, n_union = _own_blocks(choices)
    if QPP > 1:
        n_union = _union_size(tile_row, QPP * n, stride_te, QPP * NP)
    for entry in range(n_union):
        block = _union_entry(own, tile_row, entry, stride_te, QPP, NP)
        k, v, key_ok, key_pos = _load_block(
            k_cols, v_cols, dk_ok, dv_ok, block, last, stride_kt, stride_vt, L_SEL, BLOCK_L
        )
        visible = _visible_keys(choices, block, key_ok, key_pos, t)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.where(visible, tl.exp2(qk - lse[:, None]), 0.0)
        ds = p * (tl.dot(do, tl.trans(v), input_precision=PRECISION) - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    dq = dq * scale
    if GATED:
        dq = dq * gates[:, None]
    dq_rows = b * stride_dqb + t * stride_dqt + q_head * stride_dqh
    if ACCUMULATE:
        dq += _load_rows(dq_ptr, dq_rows, row_ok, dk, stride_dqd, BLOCK_DK).to(tl.float32)
    _store_rows(dq_ptr, dq_rows, row_ok, dq, dk, stride_dqd, BLOCK_DK)


@autotune(
    _DKDV_CANDIDATES,
    _INTERPRETER_DKDV,
    _ATTENTION_KEY,
    small_head=_SMALL_HEAD_DKDV,
    head_dim_arg="dk",
    reset_to_zero=["dk_ptr", "dv_ptr"],
)
@triton.jit
def _selection_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, gate_ptr, dk_ptr, dv_ptr, items_ptr, pos_ptr,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kg, stride_kd,
    stride_vb, stride_vt, stride_vg, stride_vd,
    stride_dob, stride_dot, stride_doh, stride_dod,
    stride_lb, stride_lt, stride_lh,
    stride_gb, stride_gt, stride_gh,
    stride_dkb, stride_dkt, stride_dkg, stride_dkd,
    stride_dvb, stride_dvt, stride_dvg, stride_dvd,
    t_len, n_groups, n_sel, hpg, dk, dv, qk_scale, scale,
    L_SEL: tl.constexpr, HPP: tl.constexpr, ROWS: tl.constexpr, BLOCK_L: tl.constexpr,
    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
    GATED: tl.constexpr,
):  # fmt: skip
    """dK/dV of one selection block from one piece of the queries that chose it.

    K/V of the block stay in registers while the piece's queries stream past,
    ``ceil(ROWS / HPP)`` positions (all their group heads) per step, in transposed form
    (keys x rows) so both gradients accumulate as ``[BLOCK_L, D]``. The partial sums
    leave by one float32 atomic add per element: other pieces of the same block add theirs.
    """
    item = items_ptr + tl.program_id(0) * 3
    bucket = tl.load(item)
    start = tl.load(item + 1)
    stop = tl.load(item + 2)
    block = bucket % n_sel
    b = bucket // n_sel // n_groups
    g = bucket // n_sel % n_groups
    k_cols, dk_ok = _columns(k_ptr + b * stride_kb + g * stride_kg, dk, stride_kd, BLOCK_DK)
    v_cols, dv_ok = _columns(v_ptr + b * stride_vb + g * stride_vg, dv, stride_vd, BLOCK_DV)
    # An empty piece (past the real ones) loads no key and adds nothing: every key masked.
    last = tl.where(stop > start, t_len - 1, -1)
    k, v, key_ok, key_pos = _load_block(
        k_cols, v_cols, dk_ok, dv_ok, block, last, stride_kt, stride_vt, L_SEL, BLOCK_L
    )
    QUERIES: tl.constexpr = (ROWS + HPP - 1) // HPP
    row = tl.arange(0, QUERIES * HPP)
    head = row % HPP
    q_head = g * hpg + head
    dk_acc = tl.zeros((BLOCK_L, BLOCK_DK), dtype=tl.float32)
    dv_acc = tl.zeros((BLOCK_L, BLOCK_DV), dtype=tl.float32)
    for first in range(start, stop, QUERIES):
        entry = first + row // HPP
        row_ok = (entry < stop) & (head < hpg)
        t = tl.load(pos_ptr + entry, mask=entry < stop, other=0).to(tl.int64)
        q_rows = b * stride_qb + t * stride_qt + q_head * stride_qh
        q = _load_rows(q_ptr, q_rows, row_ok, dk, stride_qd, BLOCK_DK)
        do_rows = b * stride_dob + t * stride_dot + q_head * stride_doh
        do = _load_rows(do_ptr, do_rows, row_ok, dv, stride_dod, BLOCK_DV)
        if GATED:  # delta arrives gated from the dQ kernel
            gates = _row_gates(gate_ptr, b, t, q_head, row_ok, stride_gb, stride_gt, stride_gh)
            do = (do.to(tl.float32) * gates[:, None]).to(q.dtype)
        row_stat = b * stride_lb + t * stride_lt + q_head * stride_lh
        lse = tl.load(lse_ptr + row_stat, mask=row_ok, other=0.0)
        delta = tl.load(delta_ptr + row_stat, mask=row_ok, other=0.0)
        qk_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # [keys, rows]
        causal = key_pos[:, None] <= t[None, :]
        p_t = tl.where(
            key_ok[:, None] & row_ok[None, :] & causal, tl.exp2(qk_t - lse[None, :]), 0.0
        )
        dv_acc += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        ds_t = p_t * (tl.dot(v, tl.trans(do), input_precision=PRECISION) - delta[None, :])
        dk_acc += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    key_mask = key_ok[:, None]
    dk_cols, _ = _columns(dk_ptr + b * stride_dkb + g * stride_dkg, dk, stride_dkd, BLOCK_DK)
    dv_cols, _ = _columns(dv_ptr + b * stride_dvb + g * stride_dvg, dv, stride_dvd, BLOCK_DV)
    dk_out = dk_cols + key_pos[:, None] * stride_dkt
    dv_out = dv_cols + key_pos[:, None] * stride_dvt
    tl.atomic_add(dk_out, dk_acc * scale, mask=key_mask & dk_ok, sem="relaxed")
    tl.atomic_add(dv_out, dv_acc, mask=key_mask & dv_ok, sem="relaxed")
