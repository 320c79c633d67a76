"""Range attention: FlashAttention-2 kernels where every query sees one contiguous key range.

Key ``j`` stands for the positions ending at ``p_j = j * key_stride + key_offset`` and is
visible to query ``t`` iff ``t - window < p_j <= t``. Two NSA branches are instances:

- sliding window: raw keys, ``key_stride=1, key_offset=0, window=w``;
- compression: block ``i`` ends at ``i*d + l - 1``, so ``key_stride=d, key_offset=l-1``
  and no window (every earlier block stays visible).

Because visibility is monotone in both ``t`` and ``j``, query ``t`` sees the keys
``[lo(t), hi(t))`` with ``lo(t) = #keys ending at or before t - window`` and
``hi(t) = #keys ending at or before t``. A tile of queries therefore only visits the key
tiles between ``lo`` of its first query and ``hi`` of its last one (and a key tile only
the query tiles that can see it): the window branch does ``O(T * w)`` work, not
``O(T^2)``. Tiles that every query/key pair of the block can see skip the mask; only
the boundary tiles of a range build it.

Kernels (fp32 accumulation, ``tl.dot`` on the input dtype, softmax in base 2 with the
scale folded into ``log2(e)``):

- forward, grid ``(query tiles, B*H)``: online softmax, writes ``o`` and the natural
  log-sum-exp ``lse``;
- dQ, grid ``(query tiles, B*H)``: also writes ``delta = rowsum(o * do)``, the one
  per-row term the dK/dV kernel needs, so no separate preprocessing launch;
- dK/dV, grid ``(key tiles, B*G, head chunks)``: walks its heads of the group and the
  query range that sees the tile, so ``dk, dv`` accumulate in registers and leave by
  one float32 atomic add per element (head chunks exist only when key tiles are few).

Nothing of size ``T x S`` is ever materialised. A query that sees no key gets ``o = 0``
and ``lse = -inf``; its gradients are 0 (never NaN).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

from nsa_lab.kernels.nsa.spec import heads_per_group
from nsa_lab.kernels.nsa.triton_tuning import autotune, dot_precision

_LOG2E = tl.constexpr(math.log2(math.e))
_LN2 = tl.constexpr(math.log(2.0))
# Beyond any position: where a padding key ends, so that no query sees it.
_FAR = tl.constexpr(2**30)

# (BLOCK_M queries, BLOCK_N keys, num_warps, num_stages) candidates per kernel on a GPU,
# picked from sm_90 compile reports at head dim 128 (bf16): configurations that stay
# within 255 registers with little or no spilling. The autotuner times them per shape
# class. The interpreter runs the single small tile below instead: it is exact, only
# slow, and small tiles exercise more tile boundaries in tiny tests.
_FWD_TILES = [(128, 64, 8, 2), (64, 64, 8, 3), (128, 32, 8, 3), (128, 64, 8, 3)]
_DQ_TILES = [(64, 64, 8, 3), (128, 32, 8, 3), (128, 64, 8, 2)]
_DKDV_TILES = [
    (64, 32, 8, 2),
    (32, 64, 8, 2),
    (128, 32, 8, 2),
    (64, 64, 8, 2),
    (64, 64, 4, 2),
    (32, 64, 4, 3),
    (64, 128, 8, 2),
]
# Head dims up to 64: the tiles the autotuner picked from the lists above for both
# branches on an H100 (2026-11-27, 8 heads in 2 groups, 8k tokens); only these compile.
_SMALL_HEAD_FWD_TILES = [(128, 32, 8, 3)]
_SMALL_HEAD_DQ_TILES = [(128, 32, 8, 3)]
_SMALL_HEAD_DKDV_TILES = [(32, 64, 4, 3)]
_INTERPRETER_TILE = (16, 32, 4, 1)
# dK/dV programs that keep every SM of a large GPU busy (H100: 132 SMs, ~1 program each
# at these tile sizes, several waves to even out the uneven work).
DKDV_BUSY_PROGRAMS = 1024


def _tile_config(tile: tuple[int, int, int, int]) -> tuple[dict[str, int], int, int]:
    """``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` as an autotune candidate."""
    block_m, block_n, warps, stages = tile
    return {"BLOCK_M": block_m, "BLOCK_N": block_n}, warps, stages


# Tuned per head dims and branch (key_stride is 1 for the window, d for compression);
# the autotuner adds the tensor dtypes to the key itself.
_TUNING_KEY = ["D_K", "D_V", "key_stride"]


def _autotune(
    tiles: list[tuple[int, int, int, int]],
    small_head_tiles: list[tuple[int, int, int, int]],
    **options: Any,
) -> Callable:
    return autotune(
        [_tile_config(t) for t in tiles],
        _tile_config(_INTERPRETER_TILE),
        _TUNING_KEY,
        small_head=[_tile_config(t) for t in small_head_tiles],
        **options,
    )


@triton.jit
def _keys_ending_by(t, key_stride, key_offset, n_keys):
    """How many keys end at or before position ``t`` (``t`` may be negative).

    The ``maximum`` keeps the division on non-negative numbers, where the GPU's
    truncating division and floor division agree.
    """
    return tl.minimum(tl.maximum(t - key_offset + key_stride, 0) // key_stride, n_keys)


@triton.jit
def _tile_span(union_lo, union_hi, inner_lo, inner_hi, BLOCK: tl.constexpr):
    """Tile indices ``first <= full_start <= full_end <= last`` along the iterated axis.

    ``[union_lo, union_hi)`` holds every index any row of the block needs, and
    ``[inner_lo, inner_hi)`` those all rows need: tiles ``[full_start, full_end)`` lie
    inside the latter and run unmasked, the rest of ``[first, last)`` run masked.
    """
    first = union_lo // BLOCK
    last = tl.maximum(tl.cdiv(union_hi, BLOCK), first)
    full_start = tl.minimum(tl.maximum(tl.cdiv(inner_lo, BLOCK), first), last)
    full_end = tl.minimum(tl.maximum(inner_hi // BLOCK, full_start), last)
    return first, full_start, full_end, last


@triton.jit
def _key_tiles(
    t0, T, S, key_stride, key_offset, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):
    """Key tiles for queries ``[t0, t0 + BLOCK_M)``: ``lo`` and ``hi`` grow with ``t``."""
    t1 = tl.minimum(t0 + BLOCK_M, T) - 1
    return _tile_span(
        _keys_ending_by(t0 - window, key_stride, key_offset, S),
        _keys_ending_by(t1, key_stride, key_offset, S),
        _keys_ending_by(t1 - window, key_stride, key_offset, S),
        _keys_ending_by(t0, key_stride, key_offset, S),
        BLOCK_N,
    )


@triton.jit
def _query_tiles(
    j0, T, S, key_stride, key_offset, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):
    """Query tiles that see keys ``[j0, j0 + BLOCK_N)``: key ``j`` is seen by ``[p_j, p_j + w)``.

    Both ends grow with ``j``, so the first and last real key of the tile bound the range.
    """
    p0 = j0 * key_stride + key_offset
    p1 = (tl.minimum(j0 + BLOCK_N, S) - 1) * key_stride + key_offset
    return _tile_span(p0, tl.minimum(p1 + window, T), p1, tl.minimum(p0 + window, T), BLOCK_M)


@triton.jit
def _segment(SEGMENT: tl.constexpr, first, full_start, full_end, last):
    """Tile bounds of segment 0 (leading masked), 1 (unmasked) or 2 (trailing masked)."""
    start = full_end
    end = last
    if SEGMENT == 0:
        start = first
        end = full_start
    if SEGMENT == 1:
        start = full_start
        end = full_end
    return start, end


@triton.jit
def _visible(t, p, window):
    """Whether query ``t`` sees the key ending at ``p`` (broadcast shapes): ``0 <= t - p < window``.

    Padding keys are folded into ``p`` beforehand (``_FAR`` away), so the element-wise
    work of a masked tile is one subtraction and two comparisons.
    """
    d = t - p
    return (d >= 0) & (d < window)


@triton.jit
def _key_ends(j, S, key_stride, key_offset):
    """Last position of keys ``j``; padding keys (``j >= S``) end ``_FAR`` away, seen by none."""
    return tl.where(j < S, j * key_stride + key_offset, _FAR)


@triton.jit
def _load_rows(base, rows, row_stride, cols, col_stride, n_rows, n_cols, CHECK_ROWS: tl.constexpr):
    """A ``[rows, cols]`` tile, zero-padded past ``n_cols`` (and past ``n_rows`` if checked)."""
    ptrs = base + rows[:, None] * row_stride + cols[None, :] * col_stride
    mask = cols[None, :] < n_cols
    if CHECK_ROWS:
        mask = mask & (rows[:, None] < n_rows)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _tile_ptrs(base, rows, row_stride, cols, col_stride, n_rows, n_cols):
    """Pointers of a ``[rows, cols]`` tile and the mask of its in-bounds elements."""
    ptrs = base + rows[:, None] * row_stride + cols[None, :] * col_stride
    return ptrs, (rows[:, None] < n_rows) & (cols[None, :] < n_cols)


@triton.jit
def _store_rows(base, value, rows, row_stride, cols, col_stride, n_rows, n_cols):
    ptrs, mask = _tile_ptrs(base, rows, row_stride, cols, col_stride, n_rows, n_cols)
    tl.store(ptrs, value.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _add_rows(base, value, rows, row_stride, cols, col_stride, n_rows, n_cols):
    """Atomically add a ``[rows, cols]`` float32 tile into ``base`` (other programs add theirs)."""
    ptrs, mask = _tile_ptrs(base, rows, row_stride, cols, col_stride, n_rows, n_cols)
    tl.atomic_add(ptrs, value, mask=mask, sem="relaxed")


@triton.jit
def _row_gates(base, rows, row_stride, n_rows):
    """The branch gate of each query row (float32; 0 past ``n_rows``).

    A gated backward computes the gradient of ``g * o`` from the ungated ``do``: dQ is
    ``g`` times the ungated one; dK/dV see ``g * do`` and ``g * delta``, made in
    registers (``g * do`` rounded to the input dtype, as a stored one would be).
    """
    return tl.load(base + rows * row_stride, mask=rows < n_rows, other=0.0).to(tl.float32)


@triton.jit
def _load_lse_log2(base, rows, row_stride, n_rows):
    """``lse * log2(e)`` of a query tile, the offset that turns log2 scores into probabilities.

    A row that sees no key has ``lse = -inf`` and its probabilities come out ``inf``, but
    such a row only ever occurs in masked tiles, where ``tl.where`` zeroes every score it
    does not see; padding rows past ``T`` are masked the same way or never stored.
    """
    return tl.load(base + rows * row_stride, mask=rows < n_rows, other=0.0) * _LOG2E


@triton.jit
def _fwd_tiles(
    acc,
    m_i,
    l_i,
    q,
    offs_m,
    k_base,
    v_base,
    stride_ks,
    stride_kd,
    stride_vs,
    stride_vd,
    tile_start,
    tile_end,
    S,
    key_stride,
    key_offset,
    window,
    qk_scale,
    D_K: tl.constexpr,
    D_V: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Online-softmax update of ``(acc, m_i, l_i)`` over key tiles ``[tile_start, tile_end)``.

    ``m_i`` is the running row maximum in log2 units; a masked row stays at ``-inf``
    until it sees a key, so the exponent offset uses 0 in its place to avoid ``inf - inf``.
    """
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    for tile in range(tile_start, tile_end):
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, offs_n, stride_ks, offs_dk, stride_kd, S, D_K, MASKED)
        v = _load_rows(v_base, offs_n, stride_vs, offs_dv, stride_vd, S, D_V, MASKED)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if MASKED:
            key_ends = _key_ends(offs_n, S, key_stride, key_offset)
            seen = _visible(offs_m[:, None], key_ends[None, :], window)
            s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_new_safe = m_new
        if MASKED:
            m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_new_safe[:, None])
        alpha = tl.math.exp2(m_i - m_new_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@_autotune(_FWD_TILES, _SMALL_HEAD_FWD_TILES)
@triton.jit
def _fwd_kernel(
    Q,
    K,
    V,
    O,
    LSE,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_ks,
    stride_kg,
    stride_kd,
    stride_vb,
    stride_vs,
    stride_vg,
    stride_vd,
    stride_ob,
    stride_ot,
    stride_oh,
    stride_od,
    stride_lb,
    stride_lt,
    stride_lh,
    T,
    S,
    H,
    HPG,
    key_stride,
    key_offset,
    window,
    scale,
    D_K: tl.constexpr,
    D_V: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """``o`` and ``lse`` of one query tile and head.

    Later query tiles see the most keys (compression): they are launched first.
    """
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    b = (tl.program_id(1) // H).to(tl.int64)
    h = tl.program_id(1) % H
    g = h // HPG
    qk_scale = scale * _LOG2E
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load_rows(
        Q + b * stride_qb + h * stride_qh, offs_m, stride_qt, offs_dk, stride_qd, T, D_K, True
    )
    k_base = K + b * stride_kb + g * stride_kg
    v_base = V + b * stride_vb + g * stride_vg
    first, full_start, full_end, last = _key_tiles(
        tile * BLOCK_M, T, S, key_stride, key_offset, window, BLOCK_M, BLOCK_N
    )
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for segment in tl.static_range(3):
        start, end = _segment(segment, first, full_start, full_end, last)
        acc, m_i, l_i = _fwd_tiles(
            acc,
            m_i,
            l_i,
            q,
            offs_m,
            k_base,
            v_base,
            stride_ks,
            stride_kd,
            stride_vs,
            stride_vd,
            start,
            end,
            S,
            key_stride,
            key_offset,
            window,
            qk_scale,
            D_K,
            D_V,
            BLOCK_DK,
            BLOCK_DV,
            BLOCK_N,
            segment != 1,
            PRECISION,
        )
    # l_i > 0 iff the row saw a key (its maximum contributes exp2(0) = 1).
    seen_any = l_i > 0.0
    o = acc / tl.where(seen_any, l_i, 1.0)[:, None]
    lse = tl.where(seen_any, (m_i + tl.log2(tl.where(seen_any, l_i, 1.0))) * _LN2, float("-inf"))
    _store_rows(O + b * stride_ob + h * stride_oh, o, offs_m, stride_ot, offs_dv, stride_od, T, D_V)
    tl.store(LSE + b * stride_lb + h * stride_lh + offs_m * stride_lt, lse, mask=offs_m < T)


@triton.jit
def _dq_tiles(
    dq,
    q,
    do,
    lse2,
    delta,
    offs_m,
    k_base,
    v_base,
    stride_ks,
    stride_kd,
    stride_vs,
    stride_vd,
    tile_start,
    tile_end,
    S,
    key_stride,
    key_offset,
    window,
    qk_scale,
    D_K: tl.constexpr,
    D_V: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``dq += dS @ K`` over key tiles ``[tile_start, tile_end)`` (``dS`` without the scale)."""
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    for tile in range(tile_start, tile_end):
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, offs_n, stride_ks, offs_dk, stride_kd, S, D_K, MASKED)
        v = _load_rows(v_base, offs_n, stride_vs, offs_dv, stride_vd, S, D_V, MASKED)
        p = tl.math.exp2(
            tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse2[:, None]
        )
        if MASKED:
            key_ends = _key_ends(offs_n, S, key_stride, key_offset)
            seen = _visible(offs_m[:, None], key_ends[None, :], window)
            p = tl.where(seen, p, 0.0)
        ds = p * (tl.dot(do, tl.trans(v), input_precision=PRECISION) - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@_autotune(_DQ_TILES, _SMALL_HEAD_DQ_TILES, restore_value=["DQ"])
@triton.jit
def _dq_kernel(
    Q,
    K,
    V,
    O,
    DO,
    DQ,
    LSE,
    DELTA,
    GATE,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_ks,
    stride_kg,
    stride_kd,
    stride_vb,
    stride_vs,
    stride_vg,
    stride_vd,
    stride_ob,
    stride_ot,
    stride_oh,
    stride_od,
    stride_dob,
    stride_dot,
    stride_doh,
    stride_dod,
    stride_dqb,
    stride_dqt,
    stride_dqh,
    stride_dqd,
    stride_lb,
    stride_lt,
    stride_lh,
    stride_gb,
    stride_gt,
    stride_gh,
    T,
    S,
    H,
    HPG,
    key_stride,
    key_offset,
    window,
    scale,
    D_K: tl.constexpr,
    D_V: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
    GATED: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """``dq`` of one query tile and head; first writes the tile's ``delta = rowsum(o * do)``.

    ``DELTA`` shares the strides of ``LSE``. Tiles run in reverse, as in the forward.
    ``GATED``: the gradient of ``GATE * o`` (per row), which is ``GATE * dq``; ``DELTA``
    then holds ``GATE * delta``, what the dK/dV kernel needs with its ``do`` gated.
    ``ACCUMULATE``: adds to ``DQ`` (the other branches' share) instead of writing it.
    """
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    b = (tl.program_id(1) // H).to(tl.int64)
    h = tl.program_id(1) % H
    g = h // HPG
    qk_scale = scale * _LOG2E
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load_rows(
        Q + b * stride_qb + h * stride_qh, offs_m, stride_qt, offs_dk, stride_qd, T, D_K, True
    )
    do = _load_rows(
        DO + b * stride_dob + h * stride_doh, offs_m, stride_dot, offs_dv, stride_dod, T, D_V, True
    )
    o = _load_rows(
        O + b * stride_ob + h * stride_oh, offs_m, stride_ot, offs_dv, stride_od, T, D_V, True
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    stats_offset = b * stride_lb + h * stride_lh
    if GATED:
        gates = _row_gates(GATE + b * stride_gb + h * stride_gh, offs_m, stride_gt, T)
        tl.store(DELTA + stats_offset + offs_m * stride_lt, delta * gates, mask=offs_m < T)
    else:
        tl.store(DELTA + stats_offset + offs_m * stride_lt, delta, mask=offs_m < T)
    lse2 = _load_lse_log2(LSE + stats_offset, offs_m, stride_lt, T)
    k_base = K + b * stride_kb + g * stride_kg
    v_base = V + b * stride_vb + g * stride_vg
    first, full_start, full_end, last = _key_tiles(
        tile * BLOCK_M, T, S, key_stride, key_offset, window, BLOCK_M, BLOCK_N
    )
    dq = tl.zeros([BLOCK_M, BLOCK_DK], tl.float32)
    for segment in tl.static_range(3):
        start, end = _segment(segment, first, full_start, full_end, last)
        dq = _dq_tiles(
            dq,
            q,
            do,
            lse2,
            delta,
            offs_m,
            k_base,
            v_base,
            stride_ks,
            stride_kd,
            stride_vs,
            stride_vd,
            start,
            end,
            S,
            key_stride,
            key_offset,
            window,
            qk_scale,
            D_K,
            D_V,
            BLOCK_DK,
            BLOCK_DV,
            BLOCK_N,
            segment != 1,
            PRECISION,
        )
    dq = dq * scale
    if GATED:
        dq = dq * gates[:, None]
    dq_base = DQ + b * stride_dqb + h * stride_dqh
    if ACCUMULATE:
        dq += _load_rows(dq_base, offs_m, stride_dqt, offs_dk, stride_dqd, T, D_K, True).to(
            tl.float32
        )
    _store_rows(dq_base, dq, offs_m, stride_dqt, offs_dk, stride_dqd, T, D_K)


@triton.jit
def _dkdv_tiles(
    dk,
    dv,
    k,
    v,
    key_ends,
    q_base,
    do_base,
    lse_base,
    delta_base,
    gate_base,
    stride_qt,
    stride_qd,
    stride_dot,
    stride_dod,
    stride_lt,
    stride_gt,
    tile_start,
    tile_end,
    T,
    window,
    qk_scale,
    D_K: tl.constexpr,
    D_V: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    MASKED: tl.constexpr,
    PRECISION: tl.constexpr,
    GATED: tl.constexpr,
):
    """``dv += P^T @ dO`` and ``dk += dS^T @ Q`` over query tiles ``[tile_start, tile_end)``.

    Works on transposed ``[keys, queries]`` tiles so that the accumulators stay ``[keys, dim]``.
    Padding queries (past ``T``) need no mask: their ``q``, ``do`` and ``delta`` load as 0
    and ``lse`` as 0, so their probabilities are finite and their terms vanish.
    """
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    for tile in range(tile_start, tile_end):
        offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        q = _load_rows(q_base, offs_m, stride_qt, offs_dk, stride_qd, T, D_K, MASKED)
        do = _load_rows(do_base, offs_m, stride_dot, offs_dv, stride_dod, T, D_V, MASKED)
        if GATED:  # delta arrives gated from the dQ kernel
            gates = _row_gates(gate_base, offs_m, stride_gt, T)
            do = (do.to(tl.float32) * gates[:, None]).to(q.dtype)
        lse2 = _load_lse_log2(lse_base, offs_m, stride_lt, T)
        delta = tl.load(delta_base + offs_m * stride_lt, mask=offs_m < T, other=0.0)
        p_t = tl.math.exp2(
            tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - lse2[None, :]
        )
        if MASKED:
            seen = _visible(offs_m[None, :], key_ends[:, None], window)
            p_t = tl.where(seen, p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        ds_t = p_t * (tl.dot(v, tl.trans(do), input_precision=PRECISION) - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@_autotune(_DKDV_TILES, _SMALL_HEAD_DKDV_TILES, reset_to_zero=["DK", "DV"])
@triton.jit
def _dkdv_kernel(
    Q,
    K,
    V,
    DO,
    DK,
    DV,
    LSE,
    DELTA,
    GATE,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_ks,
    stride_kg,
    stride_kd,
    stride_vb,
    stride_vs,
    stride_vg,
    stride_vd,
    stride_dob,
    stride_dot,
    stride_doh,
    stride_dod,
    stride_dkb,
    stride_dks,
    stride_dkg,
    stride_dkd,
    stride_dvb,
    stride_dvs,
    stride_dvg,
    stride_dvd,
    stride_lb,
    stride_lt,
    stride_lh,
    stride_gb,
    stride_gt,
    stride_gh,
    T,
    S,
    H,
    HPG,
    key_stride,
    key_offset,
    window,
    scale,
    D_K: tl.constexpr,
    D_V: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
    GATED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """``dk, dv`` of one key tile and kv group, summed over a share of the group's heads.

    Axis 2 of the grid splits the ``HPG`` heads into chunks: with few key tiles
    (compression: ``T / d`` keys) one program per (tile, group) would leave most of the
    GPU idle while each walks every query of every head. The chunks' partial sums meet
    in the float32 ``DK``/``DV`` by atomic adds. Program 0 holds the first key tile,
    which the most queries see (compression): the heaviest programs start first.
    """
    tile = tl.program_id(0)
    n_groups = H // HPG
    b = (tl.program_id(1) // n_groups).to(tl.int64)
    g = tl.program_id(1) % n_groups
    heads_per_chunk = tl.cdiv(HPG, tl.num_programs(2))
    first_head = tl.program_id(2) * heads_per_chunk
    last_head = tl.minimum(first_head + heads_per_chunk, HPG)
    qk_scale = scale * _LOG2E
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = _load_rows(
        K + b * stride_kb + g * stride_kg, offs_n, stride_ks, offs_dk, stride_kd, S, D_K, True
    )
    v = _load_rows(
        V + b * stride_vb + g * stride_vg, offs_n, stride_vs, offs_dv, stride_vd, S, D_V, True
    )
    # Padding keys need no masking: their rows of dk, dv are never stored.
    key_ends = offs_n * key_stride + key_offset
    first, full_start, full_end, last = _query_tiles(
        tile * BLOCK_N, T, S, key_stride, key_offset, window, BLOCK_M, BLOCK_N
    )
    dk = tl.zeros([BLOCK_N, BLOCK_DK], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for i in range(first_head, last_head):
        h = g * HPG + i
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        lse_base = LSE + b * stride_lb + h * stride_lh
        delta_base = DELTA + b * stride_lb + h * stride_lh
        gate_base = GATE + b * stride_gb + h * stride_gh
        for segment in tl.static_range(3):
            start, end = _segment(segment, first, full_start, full_end, last)
            dk, dv = _dkdv_tiles(
                dk,
                dv,
                k,
                v,
                key_ends,
                q_base,
                do_base,
                lse_base,
                delta_base,
                gate_base,
                stride_qt,
                stride_qd,
                stride_dot,
                stride_dod,
                stride_lt,
                stride_gt,
                start,
                end,
                T,
                window,
                qk_scale,
                D_K,
                D_V,
                BLOCK_DK,
                BLOCK_DV,
                BLOCK_M,
                segment != 1,
                PRECISION,
                GATED,
            )
    _add_rows(
        DK + b * stride_dkb + g * stride_dkg,
        dk * scale,
        offs_n,
        stride_dks,
        offs_dk,
        stride_dkd,
        S,
        D_K,
    )
    _add_rows(
        DV + b * stride_dvb + g * stride_dvg, dv, offs_n, stride_dvs, offs_dv, stride_dvd, S, D_V
    )


class _Keys(NamedTuple):
    """Where key ``j`` ends (``j * stride + offset``) and how far back a query looks."""

    stride: int
    offset: int
    window: int | None


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every kernel output is allocated here, uninitialised: the kernels write each element.

    One place to allocate lets the tests poison the buffers and prove that claim.
    """
    return torch.empty(shape, dtype=dtype, device=device)


def _scalars(q: torch.Tensor, k: torch.Tensor, keys: _Keys, scale: float) -> list[int | float]:
    """The runtime scalars every kernel takes, in order (``T .. scale``).

    No window is a window no query can see past: ``T + stride`` puts ``lo(t)`` at 0
    for every ``t < T``, so the kernels need no separate unbounded case.
    """
    t_len, n_heads, s_len = q.shape[1], q.shape[2], k.shape[1]
    window = t_len + keys.stride if keys.window is None else keys.window
    return [
        t_len,
        s_len,
        n_heads,
        heads_per_group(q, k),
        keys.stride,
        keys.offset,
        window,
        scale,
    ]


def _dims(q: torch.Tensor, v: torch.Tensor) -> dict[str, int | str]:
    """Head dims, their power-of-two register widths (at least 16, for ``tl.dot``) and the
    dot precision: float32 inputs (tests, references) get true fp32 products, not tf32,
    whose rounding would leave e.g. ``do.v - delta`` visibly non-zero where it must cancel.
    """
    d_k, d_v = q.shape[-1], v.shape[-1]
    return {
        "D_K": d_k,
        "D_V": d_v,
        "BLOCK_DK": max(16, triton.next_power_of_2(d_k)),
        "BLOCK_DV": max(16, triton.next_power_of_2(d_v)),
        "PRECISION": dot_precision(q.dtype),
    }


def _grid(length: int, block: str, programs: int) -> Callable[[dict], tuple[int, int]]:
    """Launch grid: tiles of ``length`` along axis 0 (tile size from the chosen config)."""
    return lambda meta: (triton.cdiv(length, meta[block]), programs)


def _dkdv_grid(n_keys: int, programs: int, hpg: int) -> Callable[[dict], tuple[int, int, int]]:
    """dK/dV grid: key tiles x (batch, group) x head chunks, split until the GPU is busy.

    Compression at 64k with ``d=16`` has only ~64 key tiles per group; without the split
    a few hundred programs would each walk every query of 16 heads.
    """

    def grid(meta: dict) -> tuple[int, int, int]:
        tiles = triton.cdiv(n_keys, meta["BLOCK_N"])
        chunks = min(hpg, triton.cdiv(DKDV_BUSY_PROGRAMS, tiles * programs))
        return tiles, programs, triton.cdiv(hpg, triton.cdiv(hpg, chunks))

    return grid


def _nothing_to_attend(q: torch.Tensor, k: torch.Tensor) -> bool:
    """No queries or no keys: the answer is all zeros and no kernel is launched."""
    return q.numel() == 0 or k.shape[1] == 0


def _forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: _Keys, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    b, t_len, n_heads, _ = q.shape
    o_shape = (b, t_len, n_heads, v.shape[-1])
    if _nothing_to_attend(q, k):
        lse = torch.full((b, t_len, n_heads), -math.inf, dtype=torch.float32, device=q.device)
        return q.new_zeros(o_shape), lse
    o = _empty(o_shape, q.dtype, q.device)
    lse = _empty((b, t_len, n_heads), torch.float32, q.device)
    _fwd_kernel[_grid(t_len, "BLOCK_M", b * n_heads)](
        q,
        k,
        v,
        o,
        lse,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *o.stride(),
        *lse.stride(),
        *_scalars(q, k, keys, scale),
        **_dims(q, v),
    )
    return o, lse


def gate_args(gate: torch.Tensor | None, lse: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The gate pointer and its ``[B, T, H]`` strides for a gated backward kernel (here
    and in ``triton_selection``); without a gate, ``lse`` stands in (never read: the
    kernels compile the gate away)."""
    return (lse, (0, 0, 0)) if gate is None else (gate, gate.stride())


def _backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    do: torch.Tensor,
    dq: torch.Tensor,
    keys: _Keys,
    scale: float,
    gate: torch.Tensor | None,
    accumulate: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    if _nothing_to_attend(q, k):
        if not accumulate:
            dq.zero_()
        return torch.zeros_like(k), torch.zeros_like(v)
    b, t_len, n_heads, _ = q.shape
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)  # atomic-add targets
    dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    delta = _empty(lse.shape, torch.float32, q.device)  # same strides as lse: both contiguous
    scalars, dims = _scalars(q, k, keys, scale), _dims(q, v)
    gate_ptr, gate_strides = gate_args(gate, lse)
    gated = {"GATED": gate is not None}
    _dq_kernel[_grid(t_len, "BLOCK_M", b * n_heads)](
        q,
        k,
        v,
        o,
        do,
        dq,
        lse,
        delta,
        gate_ptr,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *o.stride(),
        *do.stride(),
        *dq.stride(),
        *lse.stride(),
        *gate_strides,
        *scalars,
        **dims,
        **gated,
        ACCUMULATE=accumulate,
    )
    _dkdv_kernel[_dkdv_grid(k.shape[1], b * k.shape[2], heads_per_group(q, k))](
        q,
        k,
        v,
        do,
        dk,
        dv,
        lse,
        delta,
        gate_ptr,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *do.stride(),
        *dk.stride(),
        *dv.stride(),
        *lse.stride(),
        *gate_strides,
        *scalars,
        **dims,
        **gated,
    )
    return dk.to(k.dtype), dv.to(v.dtype)


# The kernels as PyTorch custom ops: torch.compile keeps each one as a single opaque node
# (no graph break, nothing traced into the Triton launch) and compiles what surrounds it.
@torch.library.custom_op("nsa_lab::range_attention", mutates_args=())
def _range_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    stride: int,
    offset: int,
    window: int | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, _Keys(stride, offset, window), scale)


@_range_attention_op.register_fake
def _range_attention_fake(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *_scalars: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    b, t_len, n_heads, _ = q.shape
    return q.new_empty(b, t_len, n_heads, v.shape[-1]), q.new_empty(
        b, t_len, n_heads, dtype=torch.float32
    )


@torch.library.custom_op("nsa_lab::range_attention_backward", mutates_args=("dq",))
def _range_attention_backward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    do: torch.Tensor,
    dq: torch.Tensor,
    stride: int,
    offset: int,
    window: int | None,
    scale: float,
    gate: torch.Tensor | None,
    accumulate: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _backward(
        q, k, v, o, lse, do, dq, _Keys(stride, offset, window), scale, gate, accumulate
    )


@_range_attention_backward_op.register_fake
def _range_attention_backward_fake(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *_rest: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(k), torch.empty_like(v)


def _setup_backward(ctx: Any, inputs: tuple, output: tuple) -> None:
    q, k, v, stride, offset, window, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.keys, ctx.scale = (stride, offset, window), scale
    ctx.mark_non_differentiable(lse)


def _range_attention_grad(ctx: Any, do: torch.Tensor, _dlse: torch.Tensor | None) -> tuple:
    q, k, v, o, lse = ctx.saved_tensors
    dq = torch.empty_like(q)
    dk, dv = _range_attention_backward_op(
        q, k, v, o, lse, do, dq, *ctx.keys, ctx.scale, None, False
    )
    return dq, dk, dv, None, None, None, None


_range_attention_op.register_autograd(_range_attention_grad, setup_context=_setup_backward)


def range_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    stride: int,
    offset: int,
    window: int | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of query ``t`` over the keys ``j`` with ``t - window < j*stride + offset <= t``.

    ``q [B,T,H,Dk]``, ``k [B,S,G,Dk]``, ``v [B,S,G,Dv]`` (any strides; query head ``h``
    reads kv group ``h // (H // G)``) -> ``(o [B,T,H,Dv]`` in ``q``'s dtype,
    ``lse [B,T,H]`` float32, natural log, not differentiable). ``window=None`` is
    unbounded. A query that sees no key gets ``o = 0`` and ``lse = -inf``, and
    contributes zero gradients.

    - sliding window ``w``: ``stride=1, offset=0, window=w`` over the raw keys;
    - compression (block length ``l``, stride ``d``): ``stride=d, offset=l-1,
      window=None`` over the compressed blocks.
    """
    _check_inputs(q, k, v, stride, offset, window)
    return _range_attention_op(q, k, v, stride, offset, window, scale)


def range_attention_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    do: torch.Tensor,
    dq: torch.Tensor,
    *,
    stride: int,
    offset: int,
    window: int | None,
    scale: float,
    gate: torch.Tensor | None = None,
    accumulate: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dk, dv)`` of :func:`range_attention`'s ``(o, lse)``, and its ``dq`` into ``dq``.

    For a fused NSA backward that never materialises a branch's own ``do`` or ``dq``:
    ``gate [B,T,H]`` (any strides) makes it the gradient of ``gate[..., None] * o``
    from the ungated ``do``; ``accumulate`` adds ``dq`` to what ``dq`` holds (another
    branch's share) instead of overwriting it.
    """
    return _range_attention_backward_op(
        q, k, v, o, lse, do, dq, stride, offset, window, scale, gate, accumulate
    )


def _check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    stride: int,
    offset: int,
    window: int | None,
) -> None:
    """Reject what the kernels would silently get wrong (the GQA split is checked by the spec)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k and v must be [batch, length, heads, dim]")
    if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if stride < 1 or offset < 0 or (window is not None and window < 1):
        raise ValueError(
            f"need stride >= 1, offset >= 0, window >= 1 or None; got {stride}, {offset}, {window}"
        )
    heads_per_group(q, k)
