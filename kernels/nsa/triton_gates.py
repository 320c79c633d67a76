"""Gated sum of the branch outputs, ``o = sum_c g_c * o_c``, as one Triton kernel each way.

Same function as ``spec.combine_branches``. At long context every branch output is as
large as the attention output itself (1 GiB at 64k for the paper's 64 heads x 128 dims,
bf16), so the unfused PyTorch form, one product per branch and their sums forward, and
``g_c * do`` plus ``(do * o_c).sum(-1)`` per branch backward, spends most of its time
and its peak memory on temporaries. Here the forward reads every ``o_c`` once and writes
``o``; the backward reads ``do`` and every ``o_c`` once and writes each ``do_c`` and
the gate gradients. The fused NSA backward (``triton_ops``) asks only for the gate
gradients (:func:`gate_grads_triton`): its branches take the gate themselves. Sums run
in float32.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import triton
import triton.language as tl

from nsa_lab.kernels.nsa.spec import check_gates

MAX_BRANCHES = 3
# Elements (rows x padded head dim) per program.
TILE_ELEMENTS = 4096


def gated_sum_triton(
    outputs: Mapping[str, torch.Tensor], gates: torch.Tensor, branches: tuple[str, ...]
) -> torch.Tensor:
    """``sum_c gates[..., c, None] * outputs[branches[c]]``, differentiable in all inputs.

    ``outputs`` ``[B,T,H,Dv]`` (one dtype), ``gates [B,T,H,C]``; the result has the
    dtype PyTorch's own products would have.
    """
    check_gates(gates, branches)
    if not 1 <= len(branches) <= MAX_BRANCHES:
        raise ValueError(f"the kernel mixes 1 to {MAX_BRANCHES} branches, not {branches}")
    return _gated_sum_op(gates, [outputs[name] for name in branches])


def gate_grads_triton(
    gates: torch.Tensor, outputs: list[torch.Tensor], d_out: torch.Tensor
) -> torch.Tensor:
    """``d gates [B,T,H,C]``: column ``c`` is ``<d_out, outputs[c]>`` per row.

    The fused NSA backward's share of the gated sum: its branches take the ungated
    ``d_out`` and their gate column, so no ``g_c * d_out`` is ever written.
    """
    return _gate_grads_op(gates, outputs, d_out)


def _launch_meta(dv: int) -> dict[str, int]:
    block_d = triton.next_power_of_2(dv)
    return {"BLOCK_R": max(1, TILE_ELEMENTS // block_d), "BLOCK_D": block_d}


def _padded(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Up to ``MAX_BRANCHES`` pointers: absent branches repeat the first (never read)."""
    return tensors + [tensors[0]] * (MAX_BRANCHES - len(tensors))


# Custom ops (see ``triton_range_attention``): opaque single nodes for torch.compile.
@torch.library.custom_op("nsa_lab::gated_sum", mutates_args=())
def _gated_sum_op(gates: torch.Tensor, outputs: list[torch.Tensor]) -> torch.Tensor:
    gates = gates.contiguous()
    outputs = [o.contiguous() for o in outputs]
    out = _gated_sum_fake(gates, outputs)
    rows, dv = out.numel() // out.shape[-1], out.shape[-1]
    meta = _launch_meta(dv)
    _gated_sum_fwd_kernel[(triton.cdiv(rows, meta["BLOCK_R"]),)](
        gates, *_padded(outputs), out, rows, dv, N_BRANCHES=len(outputs), **meta,
    )  # fmt: skip
    return out


@_gated_sum_op.register_fake
def _gated_sum_fake(gates: torch.Tensor, outputs: list[torch.Tensor]) -> torch.Tensor:
    dtype = torch.result_type(gates, outputs[0])
    return torch.empty(outputs[0].shape, dtype=dtype, device=gates.device)


@torch.library.custom_op("nsa_lab::gated_sum_backward", mutates_args=())
def _gated_sum_backward_op(
    gates: torch.Tensor, outputs: list[torch.Tensor], d_out: torch.Tensor
) -> list[torch.Tensor]:
    gates = gates.contiguous()
    outputs = [o.contiguous() for o in outputs]
    d_out = d_out.contiguous()
    d_gates, *d_outputs = _gated_sum_backward_fake(gates, outputs, d_out)
    _launch_backward(gates, outputs, d_out, d_gates, d_outputs)
    return [d_gates, *d_outputs]


@_gated_sum_backward_op.register_fake
def _gated_sum_backward_fake(
    gates: torch.Tensor, outputs: list[torch.Tensor], d_out: torch.Tensor
) -> list[torch.Tensor]:
    return [torch.empty_like(gates), *(torch.empty_like(o) for o in outputs)]


@torch.library.custom_op("nsa_lab::gate_grads", mutates_args=())
def _gate_grads_op(
    gates: torch.Tensor, outputs: list[torch.Tensor], d_out: torch.Tensor
) -> torch.Tensor:
    gates = gates.contiguous()
    outputs = [o.contiguous() for o in outputs]
    d_out = d_out.contiguous()
    d_gates = torch.empty_like(gates)
    _launch_backward(gates, outputs, d_out, d_gates, None)
    return d_gates


@_gate_grads_op.register_fake
def _gate_grads_fake(
    gates: torch.Tensor, outputs: list[torch.Tensor], d_out: torch.Tensor
) -> torch.Tensor:
    return torch.empty_like(gates)


def _launch_backward(
    gates: torch.Tensor,
    outputs: list[torch.Tensor],
    d_out: torch.Tensor,
    d_gates: torch.Tensor,
    d_outputs: list[torch.Tensor] | None,
) -> None:
    """The backward kernel over contiguous tensors; ``d_outputs=None``: gate grads only."""
    rows, dv = d_out.numel() // d_out.shape[-1], d_out.shape[-1]
    meta = _launch_meta(dv)
    branch_grads = d_outputs is not None
    _gated_sum_bwd_kernel[(triton.cdiv(rows, meta["BLOCK_R"]),)](
        gates, *_padded(outputs), d_out, d_gates, *_padded(d_outputs or [d_out]), rows, dv,
        N_BRANCHES=len(outputs), BRANCH_GRADS=branch_grads, **meta,
    )  # fmt: skip


def _setup_backward(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    gates, outputs = inputs
    ctx.save_for_backward(gates, *outputs)


def _gated_sum_grad(ctx: Any, d_out: torch.Tensor) -> tuple:
    gates, *outputs = ctx.saved_tensors
    d_gates, *d_outputs = _gated_sum_backward_op(gates, outputs, d_out)
    return d_gates, d_outputs


_gated_sum_op.register_autograd(_gated_sum_grad, setup_context=_setup_backward)


@triton.jit
def _tile(rows_start, n_rows, dv, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Flat offsets ``[BLOCK_R, BLOCK_D]`` of a row tile, its mask, and its row indices."""
    rows = rows_start + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < n_rows)[:, None] & (cols < dv)[None, :]
    return rows.to(tl.int64)[:, None] * dv + cols[None, :], mask, rows


@triton.jit
def _branch(c: tl.constexpr, ptr0, ptr1, ptr2):
    """Pointer ``c`` of three, chosen at compile time."""
    ptr = ptr0
    if c == 1:
        ptr = ptr1
    if c == 2:
        ptr = ptr2
    return ptr


@triton.jit
def _gated_sum_fwd_kernel(
    g_ptr, o0_ptr, o1_ptr, o2_ptr, out_ptr, n_rows, dv,
    N_BRANCHES: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    offs, mask, rows = _tile(tl.program_id(0) * BLOCK_R, n_rows, dv, BLOCK_R, BLOCK_D)
    row_ok = rows < n_rows
    g_row = g_ptr + rows.to(tl.int64) * N_BRANCHES
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for c in tl.static_range(N_BRANCHES):
        o_ptr = _branch(c, o0_ptr, o1_ptr, o2_ptr)
        g = tl.load(g_row + c, mask=row_ok, other=0.0).to(tl.float32)
        acc += g[:, None] * tl.load(o_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_sum_bwd_kernel(
    g_ptr, o0_ptr, o1_ptr, o2_ptr, dout_ptr, dg_ptr, do0_ptr, do1_ptr, do2_ptr, n_rows, dv,
    N_BRANCHES: tl.constexpr, BRANCH_GRADS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """``d g_c = <d_out, o_c>`` (per row) for every branch and, with ``BRANCH_GRADS``,
    ``d o_c = g_c * d_out``."""
    offs, mask, rows = _tile(tl.program_id(0) * BLOCK_R, n_rows, dv, BLOCK_R, BLOCK_D)
    row_ok = rows < n_rows
    g_row = rows.to(tl.int64) * N_BRANCHES
    d_out = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    for c in tl.static_range(N_BRANCHES):
        o_ptr = _branch(c, o0_ptr, o1_ptr, o2_ptr)
        do_ptr = _branch(c, do0_ptr, do1_ptr, do2_ptr)
        o = tl.load(o_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if BRANCH_GRADS:
            g = tl.load(g_ptr + g_row + c, mask=row_ok, other=0.0).to(tl.float32)
            d_o = (g[:, None] * d_out).to(do_ptr.dtype.element_ty)
            tl.store(do_ptr + offs, d_o, mask=mask)
        d_g = tl.sum(d_out * o, axis=1)
        tl.store(dg_ptr + g_row + c, d_g.to(dg_ptr.dtype.element_ty), mask=row_ok)
