"""``full``: dense causal GQA attention, the quality and speed baseline."""

from __future__ import annotations

from typing import Any

import torch

from nsa_lab.attention.base import SingleKVAttention
from nsa_lab.attention.cache import KVBuffer
from nsa_lab.attention.registry import register
from nsa_lab.kernels.nsa.torch_decode import attend_keys
from nsa_lab.kernels.nsa.torch_ops import causal_attention


class FullAttention(SingleKVAttention):
    """Every query attends all earlier positions (fused ``F.scaled_dot_product_attention``)."""

    def __init__(self, model_cfg: Any, attn_cfg: Any) -> None:
        super().__init__(model_cfg)

    def attend_kv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return causal_attention(q, k, v)

    def attend_step(self, q: torch.Tensor, kv: KVBuffer, t: int, scale: float) -> torch.Tensor:
        return attend_keys(q, *kv.upto(t), scale)


register("full", "Dense causal GQA attention (baseline).", FullAttention)
