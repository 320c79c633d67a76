"""NSA through the Triton kernels: the same function and signature as ``torch_ops.nsa_attention``.

- cmp: :func:`range_attention` over the compressed blocks (block ``i`` ends at ``i*d + l - 1``);
- slc: the score + top-n kernels pick blocks from the cmp log-sum-exp, then the
  group-centric selection kernel attends them;
- win: :func:`range_attention` over raw positions with a window of ``w``;
- the gated sum of the branch outputs: :func:`gated_sum_triton`, one fused kernel.
``phi`` (a small MLP over the blocks) stays in PyTorch.
"""

from __future__ import annotations

import torch

from nsa_lab.kernels.nsa.spec import NSAParams, kernel_dtype, run_branches, softmax_scale

# The decode step lives here too: the layer picks it by name through attention/impl.op_for.
from nsa_lab.kernels.nsa.triton_decode import nsa_decode_step_triton  # noqa: F401
from nsa_lab.kernels.nsa.triton_gates import gated_sum_triton
from nsa_lab.kernels.nsa.triton_range_attention import range_attention
from nsa_lab.kernels.nsa.triton_selection import select_blocks_triton, selection_attention_triton


def compression_branch(
    q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, params: NSAParams, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(o_cmp, lse)``: attention over the compressed blocks visible to each query."""
    return range_attention(
        q, kc, vc, stride=params.d, offset=params.l - 1, window=None, scale=scale
    )


def window_branch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: NSAParams, scale: float
) -> torch.Tensor:
    o, _ = range_attention(q, k, v, stride=1, offset=0, window=params.w, scale=scale)
    return o


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


def selection_branch(
    q: torch.Tensor,
    kc: torch.Tensor,
    lse: torch.Tensor | None,
    k: torch.Tensor,
    v: torch.Tensor,
    params: NSAParams,
    scale: float,
) -> torch.Tensor:
    """Score, pick and attend. Without the cmp branch its lse is computed here, without grad."""
    if lse is None:
        with torch.no_grad():
            _, lse = compression_branch(q, kc, kc, params, scale)
    indices = select_blocks_triton(
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
    return selection_attention_triton(q, k, v, indices, l_sel=params.l_sel, scale=scale)


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
    scale = softmax_scale(q, scale)
    dtype = kernel_dtype(q)
    kc, vc, k_slc, v_slc, k_win, v_win = (
        None if t is None else t.to(dtype) for t in (kc, vc, k_slc, v_slc, k_win, v_win)
    )
    return run_branches(
        q.to(dtype),
        gates,
        params,
        compression=lambda q, kc, vc: compression_branch(q, kc, vc, params, scale),
        selection=lambda q, kc, lse, k, v: selection_branch(q, kc, lse, k, v, params, scale),
        window=lambda q, k, v: window_branch(q, k, v, params, scale),
        kc=kc,
        vc=vc,
        k_slc=k_slc,
        v_slc=v_slc,
        k_win=k_win,
        v_win=v_win,
        combine=gated_sum_triton,
    )
