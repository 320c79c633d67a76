"""``window``: sliding-window attention alone, NSA's local branch without the others."""

from __future__ import annotations

from typing import Any

import torch

from nsa_lab.attention.base import SingleKVAttention
from nsa_lab.attention.cache import KVBuffer
from nsa_lab.attention.impl import op_for
from nsa_lab.attention.registry import register
from nsa_lab.kernels.nsa.torch_decode import attend_keys
from nsa_lab.kernels.nsa.torch_ops import sliding_window_attention


class WindowAttention(SingleKVAttention):
    """Query ``t`` attends positions ``max(0, t-w+1) .. t`` with ``w = attn.w``.

    ``attn.impl`` picks the op as for NSA: on a GPU the range kernel that serves NSA's
    own window branch, so that the baseline is not slowed by the PyTorch path.
    """

    def __init__(self, model_cfg: Any, attn_cfg: Any) -> None:
        super().__init__(model_cfg)
        self.w = attn_cfg.w
        self.window_op = op_for(
            attn_cfg.impl, sliding_window_attention, "sliding_window_attention_triton"
        )

    def attend_kv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.window_op(q, k, v, self.w)

    def cache_capacity(self, max_len: int) -> int:
        """A ring of the window: decoding memory stays ``w`` positions however long."""
        return min(self.w, max_len)

    def attend_step(self, q: torch.Tensor, kv: KVBuffer, t: int, scale: float) -> torch.Tensor:
        return attend_keys(q, *kv.window(t, self.w), scale)


register("window", "Sliding-window attention alone (window attn.w).", WindowAttention)
