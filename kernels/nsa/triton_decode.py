"""One NSA decoding step through Triton kernels: same function as ``torch_decode.nsa_decode_step``.

A decoding step has one query position per sequence, so there is almost no arithmetic:
the cost is loading keys and values. The paper's decoding claim is about exactly that,
the keys a step loads (compressed blocks + ``n`` selected blocks of ``l_sel`` + the
``w`` window keys instead of all ``t + 1``), and the kernels are shaped to load each of
them once per kv group:

- every program holds all ``H/G`` query heads of one kv group as the rows of its tiles
  (padded to at least :data:`MMA_ROWS`, the rows ``tl.dot`` needs; padding rows are
  masked), so a key tile is read once for the whole group, not once per head;
- :func:`attend_keys_triton`, attention over all the given keys: the cmp branch (every
  cached compressed block is visible at ``t``) and the win branch (the window cache
  holds exactly the visible keys, in any order). Grid ``(splits, B*G)``: with one query
  per sequence, ``B*G`` programs alone would leave most of a GPU idle at small batch, so
  long key ranges are cut into splits ("flash-decoding"), each writes its normalised
  output and log-sum-exp, and a small merge kernel combines them;
- :func:`selection_decode_triton`, the group-centric selection kernel: the group's
  selected blocks (shared by its heads) are loaded once, ``l_sel`` keys from
  ``block * l_sel``, masked past ``t`` and for empty (-1) slots; split over the slots
  the same way;
- block scoring and top-n stay in PyTorch (``torch_decode.selected_blocks_decode``,
  fed the cmp kernel's log-sum-exp): ``[B, H, Nc]`` probabilities per step are small;
- the gated sum is :func:`~.triton_gates.gated_sum_triton`, one launch.

Softmax runs in base 2 with the scale folded in and accumulates in float32; float32
inputs get true fp32 dots (``ieee``). Head dims are padded to powers of two (at least
16) and masked. Nothing waits for the GPU: split counts come from shapes, never data.

Inference only: there is no backward, and :func:`nsa_decode_step_triton` raises rather
than return a result that silently lacks gradients.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from nsa_lab.kernels.nsa.spec import (
    NSAParams,
    heads_per_group,
    kernel_dtype,
    run_branches,
    softmax_scale,
)
from nsa_lab.kernels.nsa.torch_decode import selected_blocks_decode
from nsa_lab.kernels.nsa.triton_gates import gated_sum_triton
from nsa_lab.kernels.nsa.triton_tuning import autotune, dot_precision, interpreted

LOG2E = math.log2(math.e)  # exp(x) = exp2(x * LOG2E)
_LN2 = tl.constexpr(math.log(2.0))
# Rows of every tile (the group's heads, padded): the least M a tl.dot takes.
MMA_ROWS = 16
# Programs that keep a large GPU busy (H100: 132 SMs, two programs each); splits stop there.
BUSY_PROGRAMS = 264
# Keys a split holds at least, so that its merge costs little next to its loads. Under the
# interpreter (no speed to win) splits are small, so tiny tests cross split boundaries.
MIN_SPLIT_KEYS = 32 if interpreted() else 256
# Autotune candidates ((tile sizes), num_warps, num_stages) on a GPU and the interpreter's
# one. Both kernels are bound by loads in flight; the key tile is the only tile size.
_KEY_CANDIDATES = [({"BLOCK_N": 64}, 4, 2), ({"BLOCK_N": 128}, 4, 3)]
_INTERPRETER_KEYS = ({"BLOCK_N": 16}, 4, 1)
_SELECTION_CANDIDATES = [({}, 4, 2), ({}, 2, 3)]
_INTERPRETER_SELECTION = ({}, 4, 1)
_TUNING_KEY = ["HP", "D_K", "D_V"]


def nsa_decode_step_triton(
    q: torch.Tensor,
    gates: torch.Tensor,
    params: NSAParams,
    t: int,
    *,
    kc: torch.Tensor | None = None,
    vc: torch.Tensor | None = None,
    k_slc: torch.Tensor | None = None,
    v_slc: torch.Tensor | None = None,
    k_win: torch.Tensor | None = None,
    v_win: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Gated NSA output ``[B,H,Dv]`` of the query at ``t``; arguments as in
    ``torch_decode.nsa_decode_step``, result in ``q``'s dtype.

    Under autocast the inputs may come in mixed dtypes; the kernels take one, the
    autocast one. Inference only: raises if autograd would need a gradient.
    """
    caches = {"kc": kc, "vc": vc, "k_slc": k_slc, "v_slc": v_slc, "k_win": k_win, "v_win": v_win}
    _refuse_autograd(q, gates, *caches.values())
    scale = softmax_scale(q, scale)
    dtype = kernel_dtype(q)
    caches = {name: None if x is None else x.to(dtype) for name, x in caches.items()}
    o = run_branches(
        q.to(dtype),
        gates,
        params,
        compression=lambda q, kc, vc: attend_keys_triton(q, kc, vc, scale),
        selection=lambda q, kc, lse, k, v: selection_decode_triton(
            q, k, v, selected_blocks_decode(q, kc, lse, params, t, scale), params.l_sel, t, scale
        ),
        window=lambda q, k, v: attend_keys_triton(q, k, v, scale)[0],
        combine=_gated_sum,
        **caches,
    )
    return o.to(q.dtype)


def attend_keys_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q [B,H,Dk]`` over every key of ``k [B,S,G,Dk]``, ``v [B,S,G,Dv]``.

    Returns ``o [B,H,Dv]`` in ``q``'s dtype and ``lse [B,H]`` (float32, natural log);
    no keys give ``o = 0`` and ``lse = -inf`` without a launch. Same function as
    ``torch_decode.compression_decode``; inference only, as every function here.
    """
    _refuse_autograd(q, k, v)
    b, h, _ = q.shape
    n_groups, n_keys = k.shape[2], k.shape[1]
    hpg = heads_per_group(q[:, None], k)
    if n_keys == 0:
        lse = torch.full((b, h), -math.inf, dtype=torch.float32, device=q.device)
        return q.new_zeros(b, h, v.shape[-1]), lse
    per_split, splits = _splits(n_keys, b * n_groups, MIN_SPLIT_KEYS)
    o_parts, lse_parts = _partials(q, v.shape[-1], splits)
    _attend_keys_kernel[(splits, b * n_groups)](
        q, k, v, o_parts, lse_parts,
        *q.stride(), *k.stride(), *v.stride(), *o_parts.stride(), *lse_parts.stride(),
        n_groups, hpg, n_keys, per_split, scale * LOG2E,
        **_dims(q, v, hpg),
    )  # fmt: skip
    return _merge(o_parts, lse_parts, q.dtype)


def selection_decode_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    l_sel: int,
    t: int,
    scale: float,
) -> torch.Tensor:
    """Attention of the query at ``t`` over its group's selected blocks: ``[B,H,Dv]``.

    ``k/v [B,S,G,D]`` with ``S > t``; ``indices [B,G,n]`` (any integer dtype) name
    selection blocks, -1 for an empty slot, in any order. Keys past ``t`` are not
    seen; a row that sees none gets 0. Same function as ``torch_decode.selection_decode``.
    """
    _refuse_autograd(q, k, v)
    b, h, _ = q.shape
    n_groups, n_slots = k.shape[2], indices.shape[-1]
    hpg = heads_per_group(q[:, None], k)
    if k.shape[1] <= t:
        raise ValueError(f"the selection cache holds {k.shape[1]} positions, not past t={t}")
    if n_slots == 0:
        return q.new_zeros(b, h, v.shape[-1])
    per_split, splits = _splits(n_slots, b * n_groups, max(1, MIN_SPLIT_KEYS // l_sel))
    o_parts, lse_parts = _partials(q, v.shape[-1], splits)
    _selection_kernel[(splits, b * n_groups)](
        q, k, v, indices, o_parts, lse_parts,
        *q.stride(), *k.stride(), *v.stride(), *indices.stride(), *o_parts.stride(),
        *lse_parts.stride(),
        n_groups, hpg, n_slots, per_split, t, scale * LOG2E,
        L_SEL=l_sel, BLOCK_L=_dim_block(l_sel), **_dims(q, v, hpg),
    )  # fmt: skip
    return _merge(o_parts, lse_parts, q.dtype)[0]


def _refuse_autograd(*tensors: torch.Tensor | None) -> None:
    """Decoding has no backward: fail loudly instead of returning a result without gradients
    (a Triton launch is invisible to autograd)."""
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in tensors):
        raise RuntimeError(
            "the Triton decode kernels are inference only (no backward); call them under "
            "torch.no_grad() or torch.inference_mode()"
        )


def _gated_sum(
    outputs: dict[str, torch.Tensor], gates: torch.Tensor, branches: tuple[str, ...]
) -> torch.Tensor:
    """The fused gated-sum kernel on ``[B,1,H,*]`` views of the step's ``[B,H,*]`` tensors."""
    views = {name: o[:, None] for name, o in outputs.items()}
    return gated_sum_triton(views, gates[:, None], branches)[:, 0]


def _splits(n_items: int, programs: int, min_per_split: int) -> tuple[int, int]:
    """``(items per split, splits)`` for ``programs`` (batch, group) pairs.

    Enough splits to make :data:`BUSY_PROGRAMS` programs, but at most one per
    ``min_per_split`` items; every split holds at least one item.
    """
    wanted = min(triton.cdiv(n_items, min_per_split), triton.cdiv(BUSY_PROGRAMS, programs))
    per_split = triton.cdiv(n_items, max(1, wanted))
    return per_split, triton.cdiv(n_items, per_split)


def _partials(q: torch.Tensor, dv: int, splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-split outputs ``[B,H,splits,Dv]`` and log-sum-exps ``[B,H,splits]``.

    A single split is already the answer, so it is written in ``q``'s dtype; several
    are kept in float32 for the merge.
    """
    b, h, _ = q.shape
    dtype = q.dtype if splits == 1 else torch.float32
    o = torch.empty(b, h, splits, dv, dtype=dtype, device=q.device)
    lse = torch.empty(b, h, splits, dtype=torch.float32, device=q.device)
    return o, lse


def _merge(
    o_parts: torch.Tensor, lse_parts: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(o [B,H,Dv], lse [B,H])`` from the splits' partial results."""
    b, h, splits, dv = o_parts.shape
    if splits == 1:
        return o_parts[:, :, 0], lse_parts[:, :, 0]
    o = torch.empty(b, h, dv, dtype=dtype, device=o_parts.device)
    lse = torch.empty(b, h, dtype=torch.float32, device=o_parts.device)
    _merge_kernel[(b * h,)](
        o_parts, lse_parts, o, lse,
        *o_parts.stride(), *lse_parts.stride(), *o.stride(), *lse.stride(),
        h, splits, dv,
        SPLITS=triton.next_power_of_2(splits), BLOCK_DV=_dim_block(dv),
    )  # fmt: skip
    return o, lse


def _dim_block(dim: int) -> int:
    """A tile width: a power of two, at least 16 (``tl.dot``)."""
    return max(16, triton.next_power_of_2(dim))


def _dims(q: torch.Tensor, v: torch.Tensor, hpg: int) -> dict[str, int | str]:
    """Compile-time sizes shared by both attention kernels, and the dot precision: float32
    inputs get exact fp32 products (tests compare at tight tolerances), others tensor cores."""
    return {
        "D_K": q.shape[-1],
        "D_V": v.shape[-1],
        "HP": max(MMA_ROWS, triton.next_power_of_2(hpg)),
        "BLOCK_DK": _dim_block(q.shape[-1]),
        "BLOCK_DV": _dim_block(v.shape[-1]),
        "PRECISION": dot_precision(q.dtype),
    }


@triton.jit
def _load_rows(base, rows, row_stride, row_ok, n_cols, col_stride, BLOCK_D: tl.constexpr):
    """A ``[rows, BLOCK_D]`` tile, zero past ``n_cols`` and in rows that are not ``row_ok``."""
    cols = tl.arange(0, BLOCK_D)
    ptrs = base + rows.to(tl.int64)[:, None] * row_stride + cols[None, :] * col_stride
    return tl.load(ptrs, mask=row_ok[:, None] & (cols < n_cols)[None, :], other=0.0)


@triton.jit
def _group_queries(
    q_ptr, pid_bg, n_groups, hpg, stride_qb, stride_qh, stride_qd,
    D_K: tl.constexpr, HP: tl.constexpr, BLOCK_DK: tl.constexpr,
):  # fmt: skip
    """The program's batch, group, head rows ``[HP]`` (real where ``head_ok``) and their
    queries ``[HP, BLOCK_DK]`` (padding rows 0)."""
    b = (pid_bg // n_groups).to(tl.int64)
    g = pid_bg % n_groups
    heads = g * hpg + tl.arange(0, HP)
    head_ok = tl.arange(0, HP) < hpg
    q = _load_rows(q_ptr + b * stride_qb, heads, stride_qh, head_ok, D_K, stride_qd, BLOCK_DK)
    return b, g, heads, head_ok, q


@triton.jit
def _attend_tile(acc, m_i, l_i, q, k, v, key_ok, qk_scale, PRECISION: tl.constexpr):
    """Online-softmax update of ``(acc, m_i, l_i)`` (log2 units) by one key tile.

    ``m_i`` starts finite, so a tile whose keys are all masked adds exactly nothing.
    """
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    s = tl.where(key_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _store_split(
    o_ptr, lse_ptr, acc, m_i, l_i, b, heads, head_ok, split,
    stride_ob, stride_oh, stride_os, stride_od, stride_lb, stride_lh, stride_ls,
    D_V: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """The split's normalised output and natural log-sum-exp (0 and ``-inf`` if it saw no key)."""
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    cols = tl.arange(0, BLOCK_DV)
    row = b * stride_ob + heads.to(tl.int64) * stride_oh + split * stride_os
    tl.store(
        o_ptr + row[:, None] + cols[None, :] * stride_od,
        (acc / l_safe[:, None]).to(o_ptr.dtype.element_ty),
        mask=head_ok[:, None] & (cols < D_V)[None, :],
    )
    lse = tl.where(seen, (m_i + tl.log2(l_safe)) * _LN2, float("-inf"))
    lse_row = lse_ptr + b * stride_lb + heads.to(tl.int64) * stride_lh + split * stride_ls
    tl.store(lse_row, lse, mask=head_ok)


@autotune(_KEY_CANDIDATES, _INTERPRETER_KEYS, _TUNING_KEY)
@triton.jit
def _attend_keys_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kg, stride_kd,
    stride_vb, stride_vs, stride_vg, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_lb, stride_lh, stride_ls,
    n_groups, hpg, n_keys, keys_per_split, qk_scale,
    D_K: tl.constexpr, D_V: tl.constexpr, HP: tl.constexpr, BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One (split, batch, group): the group's heads against keys of one split, each key
    tile loaded once for all of them."""
    split = tl.program_id(0)
    b, g, heads, head_ok, q = _group_queries(
        q_ptr, tl.program_id(1), n_groups, hpg, stride_qb, stride_qh, stride_qd, D_K, HP, BLOCK_DK
    )
    k_base = k_ptr + b * stride_kb + g * stride_kg
    v_base = v_ptr + b * stride_vb + g * stride_vg
    m_i = tl.full((HP,), -1.0e30, dtype=tl.float32)
    l_i = tl.zeros((HP,), dtype=tl.float32)
    acc = tl.zeros((HP, BLOCK_DV), dtype=tl.float32)
    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, n_keys)
    for tile_start in range(start, end, BLOCK_N):
        keys = tile_start + tl.arange(0, BLOCK_N)
        key_ok = keys < end
        k = _load_rows(k_base, keys, stride_ks, key_ok, D_K, stride_kd, BLOCK_DK)
        v = _load_rows(v_base, keys, stride_vs, key_ok, D_V, stride_vd, BLOCK_DV)
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k, v, key_ok, qk_scale, PRECISION)
    _store_split(
        o_ptr, lse_ptr, acc, m_i, l_i, b, heads, head_ok, split,
        stride_ob, stride_oh, stride_os, stride_od, stride_lb, stride_lh, stride_ls,
        D_V, BLOCK_DV,
    )  # fmt: skip


@autotune(_SELECTION_CANDIDATES, _INTERPRETER_SELECTION, _TUNING_KEY)
@triton.jit
def _selection_kernel(
    q_ptr, k_ptr, v_ptr, idx_ptr, o_ptr, lse_ptr,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kg, stride_kd,
    stride_vb, stride_vs, stride_vg, stride_vd,
    stride_ib, stride_ig, stride_in,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_lb, stride_lh, stride_ls,
    n_groups, hpg, n_slots, slots_per_split, t, qk_scale,
    L_SEL: tl.constexpr, BLOCK_L: tl.constexpr,
    D_K: tl.constexpr, D_V: tl.constexpr, HP: tl.constexpr, BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One (split, batch, group): the group's heads against the blocks in its slots.

    The group's heads share their selection, so each block is loaded once for all of
    them. Keys past ``t`` and the blocks of empty (-1) slots are masked (never read).
    """
    split = tl.program_id(0)
    b, g, heads, head_ok, q = _group_queries(
        q_ptr, tl.program_id(1), n_groups, hpg, stride_qb, stride_qh, stride_qd, D_K, HP, BLOCK_DK
    )
    k_base = k_ptr + b * stride_kb + g * stride_kg
    v_base = v_ptr + b * stride_vb + g * stride_vg
    idx_base = idx_ptr + b * stride_ib + g * stride_ig
    m_i = tl.full((HP,), -1.0e30, dtype=tl.float32)
    l_i = tl.zeros((HP,), dtype=tl.float32)
    acc = tl.zeros((HP, BLOCK_DV), dtype=tl.float32)
    offset = tl.arange(0, BLOCK_L)
    start = split * slots_per_split
    for slot in range(start, tl.minimum(start + slots_per_split, n_slots)):
        block = tl.load(idx_base + slot * stride_in).to(tl.int64)
        keys = block * L_SEL + offset
        key_ok = (offset < L_SEL) & (keys >= 0) & (keys <= t)  # an empty slot: keys < 0
        k = _load_rows(k_base, keys, stride_ks, key_ok, D_K, stride_kd, BLOCK_DK)
        v = _load_rows(v_base, keys, stride_vs, key_ok, D_V, stride_vd, BLOCK_DV)
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k, v, key_ok, qk_scale, PRECISION)
    _store_split(
        o_ptr, lse_ptr, acc, m_i, l_i, b, heads, head_ok, split,
        stride_ob, stride_oh, stride_os, stride_od, stride_lb, stride_lh, stride_ls,
        D_V, BLOCK_DV,
    )  # fmt: skip


@triton.jit
def _merge_kernel(
    o_parts_ptr, lse_parts_ptr, o_ptr, lse_ptr,
    stride_pb, stride_ph, stride_ps, stride_pd,
    stride_qb, stride_qh, stride_qs,
    stride_ob, stride_oh, stride_od,
    stride_lb, stride_lh,
    n_heads, n_splits, D_V,
    SPLITS: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """One (batch, head): ``o = sum_s exp(lse_s - lse) o_s`` with ``lse = log sum_s exp(lse_s)``.

    Splits that saw no key (``lse_s = -inf``) weigh 0; if none saw one, ``o = 0`` and
    ``lse = -inf``.
    """
    b = (tl.program_id(0) // n_heads).to(tl.int64)
    h = tl.program_id(0) % n_heads
    split = tl.arange(0, SPLITS)
    split_ok = split < n_splits
    lse_parts = tl.load(
        lse_parts_ptr + b * stride_qb + h * stride_qh + split * stride_qs,
        mask=split_ok,
        other=float("-inf"),
    )
    m = tl.max(lse_parts, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    weights = tl.exp(lse_parts - m_safe)
    total = tl.sum(weights, 0)
    cols = tl.arange(0, BLOCK_DV)
    parts = tl.load(
        o_parts_ptr + b * stride_pb + h * stride_ph + split[:, None] * stride_ps
        + cols[None, :] * stride_pd,
        mask=split_ok[:, None] & (cols < D_V)[None, :],
        other=0.0,
    )  # fmt: skip
    total_safe = tl.where(total > 0.0, total, 1.0)
    o = tl.sum(weights[:, None] * parts, 0) / total_safe
    tl.store(
        o_ptr + b * stride_ob + h * stride_oh + cols * stride_od,
        o.to(o_ptr.dtype.element_ty),
        mask=cols < D_V,
    )
    lse = tl.where(total > 0.0, m_safe + tl.log(total_safe), float("-inf"))
    tl.store(lse_ptr + b * stride_lb + h * stride_lh, lse)
