"""One NSA decoding step in plain PyTorch: a single query position per sequence.

Same function as :func:`~.torch_ops.nsa_attention` at one position ``t``, computed from
caches instead of whole sequences, and sparse the way the paper counts it: a step reads
the compressed keys, ``n`` selected blocks of ``l_sel`` keys and the ``w`` window keys,
not all ``t + 1`` keys.

- cmp: every cached compressed block is visible (a block enters the cache once its
  last position has passed), so the step is plain attention over them;
- slc: the cmp probabilities, summed over the group's heads, are spread onto selection
  blocks by the spec's overlap counts; forced blocks first, then by score, ties to the
  lower index; the chosen blocks' keys are gathered from the selection cache;
- win: attention over the window's keys, which may come in any order (a ring buffer).

Tensors: ``q [B,H,Dk]``, gates ``[B,H,C]``, caches ``[B, S, G, D]``; the output is
``[B,H,Dv]``. The Triton kernels of :mod:`.triton_decode` compute the same function.
"""

from __future__ import annotations

import math

import torch

from nsa_lab.kernels.nsa.spec import NSAParams, heads_per_group, run_branches, softmax_scale
from nsa_lab.kernels.nsa.torch_ops import overlap_matrix


def nsa_decode_step(
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
    """Gated NSA output ``[B,H,Dv]`` of the query at position ``t``.

    ``kc/vc [B,Nc,G,D]``: the compressed blocks completed by ``t`` (``Nc =
    floor((t+1-l)/d) + 1``, at least 0); ``k_slc/v_slc [B,S,G,D]``: keys of positions
    ``0 .. S-1`` with ``S > t`` (later ones are ignored); ``k_win/v_win``: exactly the
    keys of positions ``max(0, t-w+1) .. t``, in any order. Pass what the active
    branches need, as for ``nsa_attention``.
    """
    scale = softmax_scale(q, scale)
    return run_branches(
        q,
        gates,
        params,
        compression=lambda q, kc, vc: compression_decode(q, kc, vc, scale),
        selection=lambda q, kc, lse, k, v: selection_decode(
            q, k, v, selected_blocks_decode(q, kc, lse, params, t, scale), params.l_sel, t, scale
        ),
        window=lambda q, k, v: attend_keys(q, k, v, scale),
        kc=kc,
        vc=vc,
        k_slc=k_slc,
        v_slc=v_slc,
        k_win=k_win,
        v_win=v_win,
    )


def compressed_blocks_done(t: int, l: int, d: int) -> int:
    """How many compressed blocks end at or before position ``t``: ``i*d + l - 1 <= t``."""
    return max(0, (t + 1 - l) // d + 1)


def compression_decode(
    q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(o [B,H,Dv], lse [B,H])`` over every given compressed block (none: 0 and -inf)."""
    logits = group_logits(q, kc.transpose(1, 2), scale)  # [B, G, hpg, Nc]
    lse = torch.logsumexp(logits, dim=-1)
    if kc.shape[1] == 0:
        return q.new_zeros(*q.shape[:2], vc.shape[-1]), lse.flatten(1)
    probs = torch.exp(logits - lse[..., None]).to(vc.dtype)
    o = torch.einsum("bghn,bngd->bghd", probs, vc)
    return o.flatten(1, 2), lse.flatten(1)


def selected_blocks_decode(
    q: torch.Tensor,
    kc: torch.Tensor,
    lse: torch.Tensor | None,
    params: NSAParams,
    t: int,
    scale: float,
) -> torch.Tensor:
    """The selection blocks of the query at ``t``: int64 ``[B,G,n]`` in rank order, -1 padded."""
    logits = group_logits(q, kc.transpose(1, 2), scale)
    if lse is None:
        lse = torch.logsumexp(logits, dim=-1).flatten(1)
    probs = torch.exp(logits - lse.view(logits.shape[:3])[..., None])  # [B, G, hpg, Nc]
    n_sel = t // params.l_sel + 1  # blocks up to the query's own
    overlap = overlap_matrix(kc.shape[1], n_sel, params.l, params.d, params.l_sel, probs)
    scores = probs.sum(dim=2) @ overlap  # [B, G, Nsel]
    return block_order(scores, t, params.l_sel, params.n, params.force_init_local)


def block_order(
    scores: torch.Tensor, t: int, l_sel: int, n: int, force_init_local: bool
) -> torch.Tensor:
    """Top-``n`` of ``scores [B,G,Nsel]`` (the blocks up to ``t``'s own) for the query at
    ``t``: forced blocks first, then by score, ties to the lower index; -1 padded."""
    current = t // l_sel
    block = torch.arange(scores.shape[-1], device=scores.device)
    if force_init_local:
        forced = (block == 0) | (block == current) | (block == current - 1)
        scores = scores.masked_fill(forced, math.inf)
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :n]
    return torch.nn.functional.pad(order, (0, n - order.shape[-1]), value=-1)


def selection_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    l_sel: int,
    t: int,
    scale: float,
) -> torch.Tensor:
    """Attention of the query at ``t`` over its group's selected blocks (keys up to ``t``)."""
    positions = indices[..., None] * l_sel + torch.arange(l_sel, device=q.device)  # [B,G,n,l']
    visible = (indices[..., None] >= 0) & (positions <= t)
    flat = positions.clamp(0, t).flatten(2)  # [B, G, n*l']
    keys = _gather_positions(k, flat)
    values = _gather_positions(v, flat)
    return attend_keys(q, keys, values, scale, visible.flatten(2), grouped=True)


def attend_keys(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    visible: torch.Tensor | None = None,
    grouped: bool = False,
) -> torch.Tensor:
    """Softmax attention of ``q [B,H,Dk]`` over keys ``[B,S,G,D]`` (or ``[B,G,S,D]`` when
    ``grouped``), optionally masked by ``visible [B,G,S]``; no key visible gives 0."""
    if not grouped:
        k, v = k.transpose(1, 2), v.transpose(1, 2)
    b, h, _ = q.shape
    logits = group_logits(q, k, scale)
    if visible is not None:
        logits = logits.masked_fill(~visible[:, :, None], -math.inf)
    if logits.shape[-1] == 0:
        return q.new_zeros(b, h, v.shape[-1])
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    probs = torch.exp(logits - lse).nan_to_num(0.0).to(v.dtype)  # an empty row: all -inf
    return torch.einsum("bghs,bgsd->bghd", probs, v).flatten(1, 2)


def group_logits(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """``[B, G, hpg, S]`` scaled logits of ``q [B,H,Dk]`` against keys ``[B,G,S,Dk]``,
    at least float32 (query head ``h`` in group ``h // hpg``)."""
    b, h, dk = q.shape
    n_groups = k.shape[1]
    heads_per_group(q[:, None], k.transpose(1, 2))
    q_grouped = q.view(b, n_groups, h // n_groups, dk) * scale
    logits = torch.einsum("bghd,bgsd->bghs", q_grouped, k)
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _gather_positions(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``x [B,S,G,D]`` at ``positions [B,G,P]`` -> ``[B,G,P,D]``."""
    source = x.transpose(1, 2)  # [B, G, S, D]
    index = positions[..., None].expand(-1, -1, -1, x.shape[-1])
    return torch.gather(source, 2, index)
