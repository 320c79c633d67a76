"""NSA through the Triton kernels: the same function and signature as ``torch_ops.nsa_attention``.

- cmp: :func:`range_attention` over the compressed blocks (block ``i`` ends at ``i*d + l - 1``);
- slc: the score + top-n kernels pick blocks from the cmp log-sum-exp, then the
  group-centric selection kernel attends them;
- win: :func:`range_attention` over raw positions with a window of ``w``;
- the gated sum of the branch outputs: :func:`gated_sum_triton`, one fused kernel.
``phi`` (a small MLP over the blocks) stays in PyTorch.

The branches and their gated sum are one autograd node (:class:`_GatedBranches`). Its
backward computes the gate gradients, then hands every branch the ungated ``do`` and
its gate column: each branch's dQ kernel scales its dQ by the gate and adds it into one
buffer, and its dK/dV kernel scales ``do`` by the gate as it loads it. Separate nodes
would write ``g_c * do`` and a ``dq`` per branch, six tensors as large as the output
(1 GiB each at 64k in the paper's shape).
"""

from __future__ import annotations

from typing import Any

import torch

from nsa_lab.kernels.nsa.spec import NSAParams, check_gates, kernel_dtype, softmax_scale

# The decode step lives here too: the layer picks it by name through attention/impl.op_for.
from nsa_lab.kernels.nsa.triton_decode import nsa_decode_step_triton  # noqa: F401
from nsa_lab.kernels.nsa.triton_gates import gate_grads_triton, gated_sum_triton
from nsa_lab.kernels.nsa.triton_range_attention import range_attention, range_attention_backward
from nsa_lab.kernels.nsa.triton_selection import (
    select_blocks_triton,
    selection_attention_backward,
    selection_attention_forward,
)


def _cmp_keys(params: NSAParams) -> dict[str, int | None]:
    """The compression branch as a range: block ``i`` ends at ``i*d + l - 1``, no window."""
    return {"stride": params.d, "offset": params.l - 1, "window": None}


def _win_keys(params: NSAParams) -> dict[str, int | None]:
    """The window branch as a range: raw keys, the last ``w`` positions."""
    return {"stride": 1, "offset": 0, "window": params.w}


def compression_branch(
    q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, params: NSAParams, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(o_cmp, lse)``: attention over the compressed blocks visible to each query."""
    return range_attention(q, kc, vc, **_cmp_keys(params), scale=scale)


def window_branch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: NSAParams, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(o_win, lse)``: attention over the last ``w`` positions, the query's own included."""
    return range_attention(q, k, v, **_win_keys(params), scale=scale)


def sliding_window_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: int, scale: float | None = None
) -> torch.Tensor:
    """The ``window`` variant's attention through the range kernel; as
    ``torch_ops.sliding_window_attention``, in the autocast dtype (see
    :func:`nsa_attention_triton`), so the baseline that ablations compare against runs
    on the same fast path as NSA's own window branch."""
    dtype = kernel_dtype(q)
    o, _ = range_attention(
        q.to(dtype),
        k.to(dtype),
        v.to(dtype),
        stride=1,
        offset=0,
        window=w,
        scale=softmax_scale(q, scale),
    )
    return o


def selection_indices(
    q: torch.Tensor,
    kc: torch.Tensor,
    lse: torch.Tensor | None,
    params: NSAParams,
    scale: float,
) -> torch.Tensor:
    """The blocks each query's group selects ``[B,T,G,n]``, scored from the cmp branch's
    log-sum-exp; without the cmp branch that lse is computed here. No gradient flows."""
    with torch.no_grad():
        if lse is None:
            _, lse = compression_branch(q, kc, kc, params, scale)
        return select_blocks_triton(
            q.detach(),
            kc.detach(),
            lse,
            l=params.l,
            d=params.d,
            l_sel=params.l_sel,
            n=params.n,
            force_init_local=params.force_init_local,
            scale=scale,
        )


class _GatedBranches(torch.autograd.Function):
    """``sum_c gates[..., c] * o_c`` over the branches of ``params``, one autograd node.

    Saves each branch's inputs, output and log-sum-exp (and the selection's indices and
    tile unions). The backward (module doc) takes the gate gradients first, from ``do``
    and the saved outputs, then runs each branch's gated backward into a shared ``dq``.
    """

    @staticmethod
    def forward(
        ctx: Any,
        q: torch.Tensor,
        gates: torch.Tensor,
        kc: torch.Tensor | None,
        vc: torch.Tensor | None,
        k_slc: torch.Tensor | None,
        v_slc: torch.Tensor | None,
        k_win: torch.Tensor | None,
        v_win: torch.Tensor | None,
        params: NSAParams,
        scale: float,
    ) -> torch.Tensor:
        outputs, saved = {}, {}
        lse = None
        if "cmp" in params.branches:
            outputs["cmp"], lse = compression_branch(q, kc, vc, params, scale)
            saved["cmp"] = (kc, vc, lse)
        if "slc" in params.branches:
            indices = selection_indices(q, kc, lse, params, scale)
            o, slc_lse, tiles = selection_attention_forward(
                q, k_slc, v_slc, indices, l_sel=params.l_sel, scale=scale
            )
            outputs["slc"] = o
            saved["slc"] = (k_slc, v_slc, slc_lse, indices, tiles)
        if "win" in params.branches:
            outputs["win"], win_lse = window_branch(q, k_win, v_win, params, scale)
            saved["win"] = (k_win, v_win, win_lse)
        out = gated_sum_triton(outputs, gates, params.branches)
        ctx.save_for_backward(
            q, gates, *(t for name in params.branches for t in (outputs[name], *saved[name]))
        )
        ctx.sizes = [1 + len(saved[name]) for name in params.branches]
        ctx.params, ctx.scale = params, scale
        return out

    @staticmethod
    def backward(ctx: Any, do: torch.Tensor) -> tuple:
        q, gates, *flat = ctx.saved_tensors
        params, scale = ctx.params, ctx.scale
        per_branch, at = {}, 0
        for name, size in zip(params.branches, ctx.sizes, strict=True):
            per_branch[name], at = flat[at : at + size], at + size
        outputs = [per_branch[name][0] for name in params.branches]
        do = do.to(q.dtype)  # the gated sum's dtype: float32 where the gates are
        d_gates = gate_grads_triton(gates, outputs, do)
        dq = torch.empty_like(q)
        grads: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for c, name in enumerate(params.branches):
            o, k, v, lse, *selection = per_branch[name]
            common = {"scale": scale, "gate": gates[..., c], "accumulate": c > 0}
            if name == "slc":
                indices, tiles = selection
                grads[name] = selection_attention_backward(
                    q, k, v, indices, tiles, o, lse, do, dq, l_sel=params.l_sel, **common
                )
            else:
                keys = _cmp_keys(params) if name == "cmp" else _win_keys(params)
                grads[name] = range_attention_backward(q, k, v, o, lse, do, dq, **keys, **common)
        none = (None, None)
        return (
            dq,
            d_gates,
            *grads.get("cmp", none),
            *grads.get("slc", none),
            *grads.get("win", none),
            None,
            None,
        )


def nsa_attention_triton(
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
    """Gated NSA output ``[B,T,H,Dv]``; arguments as in ``torch_ops.nsa_attention``.

    Under autocast the projections arrive in mixed dtypes (bf16 from linear layers,
    fp32 from RoPE); the kernels take one dtype, the autocast one.
    """
    check_gates(gates, params.branches)  # before any kernel runs
    scale = softmax_scale(q, scale)
    dtype = kernel_dtype(q)
    kc, vc, k_slc, v_slc, k_win, v_win = (
        None if t is None else t.to(dtype) for t in (kc, vc, k_slc, v_slc, k_win, v_win)
    )
    return _GatedBranches.apply(
        q.to(dtype), gates, kc, vc, k_slc, v_slc, k_win, v_win, params, scale
    )
