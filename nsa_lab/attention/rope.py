"""Rotary position embeddings (rotate-half layout, as in GPT-NeoX and Llama).

The model builds the tables once, for every position up to ``model.max_seq_len``, keeps
them as buffers that move with it, and hands each forward's rows to every layer, so no
layer (and no compiled graph) recomputes trigonometry.
"""

from __future__ import annotations

import torch


def rope_tables(
    head_dim: int, seq_len: int, theta: float, device: torch.device | str, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)``, each ``[seq_len, head_dim // 2]`` on ``device``, in ``dtype``;
    angles computed in float64 (float32 on MPS, which has no float64)."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    device = torch.device(device)
    wide = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=wide, device=device) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=wide, device=device), inv_freq)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, T, H, D]``: each pair ``(x_i, x_{i + D/2})`` turns by angle ``t * f_i``.

    The rotation runs in the tables' precision and the result comes back in ``x``'s
    dtype: under bf16 autocast the projections are bf16, and a float32 result would only
    be cast back before attention, after costing twice the memory traffic.
    """
    cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)
