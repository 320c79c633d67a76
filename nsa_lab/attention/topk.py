"""``topk``: an oracle baseline for NSA's selection branch.

Each query attends exactly the ``n`` selection blocks (length ``l_sel``, same forced
blocks as NSA) that hold the largest *true* attention mass, summed over its group's
heads and computed exactly from the full ``q.k`` scores. It answers "how good could
block selection be if the scoring were perfect", at ``O(T^2)`` compute (chunked over
queries, so memory stays ``O(T * chunk)``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from nsa_lab.attention.base import SingleKVAttention
from nsa_lab.attention.cache import KVBuffer
from nsa_lab.attention.registry import register
from nsa_lab.kernels.nsa.spec import heads_per_group, softmax_scale
from nsa_lab.kernels.nsa.torch_decode import block_order, group_logits, selection_decode
from nsa_lab.kernels.nsa.torch_ops import (
    causal_mask,
    query_chunks,
    select_blocks,
    selection_attention,
)


def true_block_mass(
    q: torch.Tensor, k: torch.Tensor, l_sel: int, scale: float | None = None
) -> torch.Tensor:
    """Causal attention mass per selection block, summed over a group's heads: ``[B,T,G,Nsel]``."""
    b, t_len, h, dk = q.shape
    n_groups, hpg = k.shape[2], heads_per_group(q, k)
    n_sel = math.ceil(t_len / l_sel)
    chunks = []
    with torch.no_grad():
        for start, end in query_chunks(t_len):
            q_grouped = q[:, start:end].reshape(b, end - start, n_groups, hpg, dk)
            logits = torch.einsum("bcghd,bsgd->bcghs", q_grouped, k[:, :end])
            hidden = ~causal_mask(start, end, 0, q.device)[:, None, None, :]
            probs = torch.softmax(
                (logits * softmax_scale(q, scale)).masked_fill(hidden, -math.inf), dim=-1
            ).sum(dim=3)
            per_block = F.pad(probs, (0, n_sel * l_sel - end)).unflatten(-1, (n_sel, l_sel))
            chunks.append(per_block.sum(dim=-1))
    return torch.cat(chunks, dim=1)


class TopkOracleAttention(SingleKVAttention):
    """Selection attention over the ``attn.n`` blocks of largest true attention mass."""

    def __init__(self, model_cfg: Any, attn_cfg: Any) -> None:
        super().__init__(model_cfg)
        self.l_sel, self.n = attn_cfg.l_sel, attn_cfg.n
        self.force_init_local = attn_cfg.force_init_local

    def attend_kv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        scores = true_block_mass(q, k, self.l_sel)
        indices = select_blocks(scores, self.n, self.l_sel, self.force_init_local)
        return selection_attention(q, k, v, indices, self.l_sel)

    def attend_step(self, q: torch.Tensor, kv: KVBuffer, t: int, scale: float) -> torch.Tensor:
        k, v = kv.upto(t)
        mass = true_block_mass_step(q, k, self.l_sel, scale)
        indices = block_order(mass, t, self.l_sel, self.n, self.force_init_local)
        return selection_decode(q, k, v, indices, self.l_sel, t, scale)


def true_block_mass_step(
    q: torch.Tensor, k: torch.Tensor, l_sel: int, scale: float
) -> torch.Tensor:
    """:func:`true_block_mass` of one query ``q [B,H,D]`` over all its keys: ``[B,G,Nsel]``."""
    t_len = k.shape[1]
    probs = torch.softmax(group_logits(q, k.transpose(1, 2), scale), dim=-1)
    n_sel = math.ceil(t_len / l_sel)
    per_block = F.pad(probs.sum(dim=2), (0, n_sel * l_sel - t_len)).unflatten(-1, (n_sel, l_sel))
    return per_block.sum(dim=-1)


register(
    "topk",
    "Oracle: attend the n selection blocks of largest true attention mass (O(T^2)).",
    TopkOracleAttention,
)
