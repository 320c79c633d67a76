"""What every attention variant shares: projections, GQA head shapes and RoPE.

A variant subclasses :class:`AttentionBase` and implements :meth:`attend`, which gets
the input and the rotated queries and returns per-head outputs; projecting queries
and outputs stays here, so variants differ only in whom each query attends.
Variants with one key/value projection subclass :class:`SingleKVAttention`.

Decoding: a variant also implements :meth:`AttentionBase.new_cache` and
:meth:`AttentionBase.attend_cached`. The first cached call is the prompt (prefill: the
training path, which also fills the cache); every later call is one new position.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nsa_lab.attention.cache import KVBuffer, LayerCache
from nsa_lab.attention.rope import apply_rope
from nsa_lab.kernels.nsa.spec import kernel_dtype, softmax_scale


class AttentionBase(nn.Module):
    """``forward(x [B,T,d_model], cos, sin) -> [B,T,d_model]`` around a variant's :meth:`attend`.

    ``H = model.n_heads`` query heads and ``G = model.n_kv_heads`` key/value heads of
    ``model.head_dim`` each; query head ``h`` reads kv head ``h // (H // G)``.
    """

    def __init__(self, model_cfg: Any) -> None:
        super().__init__()
        self.d_model = model_cfg.d_model
        self.n_heads = model_cfg.n_heads
        self.n_kv_heads = model_cfg.n_kv_heads
        self.head_dim = model_cfg.head_dim
        self.q_proj = nn.Linear(self.d_model, self.n_heads * self.head_dim, bias=False)
        # The model scales the init of every ``o_proj.weight`` (residual projection).
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, self.d_model, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        """``x`` holds the positions after those ``cache`` has seen (all of them without one)."""
        q = self.queries(x, cos, sin)
        if cache is None:
            return self.o_proj(self.attend(x, q, cos, sin).flatten(2))
        if cache.length and x.shape[1] != 1:
            raise ValueError("after the prompt, decoding takes one position per step")
        out = self.attend_cached(x, q, cos, sin, cache)
        cache.length += x.shape[1]
        return self.o_proj(out.flatten(2))

    def new_cache(self, max_len: int) -> LayerCache:
        """An empty cache for sequences of up to ``max_len`` positions."""
        raise NotImplementedError(
            f"attention {type(self).__name__} has no KV cache (new_cache, attend_cached)"
        )

    def attend_cached(
        self,
        x: torch.Tensor,
        q: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LayerCache,
    ) -> torch.Tensor:
        """:meth:`attend` for positions ``cache.length ..``, keeping what later steps need."""
        raise NotImplementedError(
            f"attention {type(self).__name__} has no KV cache (new_cache, attend_cached)"
        )

    def queries(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotated queries ``[B,T,H,head_dim]``."""
        return apply_rope(self.split_heads(self.q_proj(x)), cos, sin)

    def attend(
        self, x: torch.Tensor, q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        """Per-head outputs ``[B,T,H,head_dim]`` for rotated queries ``q [B,T,H,head_dim]``."""
        raise NotImplementedError

    def kv_linear(self) -> nn.Linear:
        """A fresh key or value projection ``d_model -> G * head_dim``."""
        return nn.Linear(self.d_model, self.n_kv_heads * self.head_dim, bias=False)

    def keys(
        self, proj: nn.Linear, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        """Rotated keys ``[B,T,G,head_dim]``."""
        return apply_rope(self.split_heads(proj(x)), cos, sin)

    def values(self, proj: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """Values ``[B,T,G,head_dim]`` (not rotated: RoPE only shapes the q.k scores)."""
        return self.split_heads(proj(x))

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, heads * head_dim] -> [B, T, heads, head_dim]``."""
        return x.unflatten(-1, (-1, self.head_dim))


class SingleKVAttention(AttentionBase):
    """A variant with one key and one value projection, attending via :meth:`attend_kv`."""

    def __init__(self, model_cfg: Any) -> None:
        super().__init__(model_cfg)
        self.k_proj = self.kv_linear()
        self.v_proj = self.kv_linear()

    def attend(
        self, x: torch.Tensor, q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        return self.attend_kv(q, self.keys(self.k_proj, x, cos, sin), self.values(self.v_proj, x))

    def attend_kv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``q [B,T,H,D]``, ``k/v [B,T,G,D]`` -> ``[B,T,H,D]``."""
        raise NotImplementedError

    def new_cache(self, max_len: int) -> LayerCache:
        return LayerCache(kv=KVBuffer(self.cache_capacity(max_len)))

    def cache_capacity(self, max_len: int) -> int:
        """Positions the cache keeps: all of them unless the variant looks back less far."""
        return max_len

    def attend_cached(
        self,
        x: torch.Tensor,
        q: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LayerCache,
    ) -> torch.Tensor:
        k, v = self.keys(self.k_proj, x, cos, sin), self.values(self.v_proj, x)
        kv, t = cache.buffers["kv"], cache.length
        kv.write(*cache_dtype(k, v), t)
        if t == 0:  # the prompt: the training path
            return self.attend_kv(q, k, v)
        return self.attend_step(q[:, 0], kv, t, softmax_scale(q, None))[:, None]

    def attend_step(self, q: torch.Tensor, kv: KVBuffer, t: int, scale: float) -> torch.Tensor:
        """The query at position ``t``, ``q [B,H,D]``, over the cache -> ``[B,H,D]``."""
        raise NotImplementedError


def cache_dtype(
    k: torch.Tensor, v: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Keys and values as a cache keeps them: in the autocast dtype under autocast (RoPE
    hands out float32 keys; a bf16 cache is half the memory and what the kernels read)."""
    dtype = kernel_dtype(k)
    return k.to(dtype), None if v is None else v.to(dtype)
