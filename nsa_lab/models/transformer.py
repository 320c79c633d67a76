"""A small decoder-only GQA transformer whose attention comes from the registry.

nanoGPT-shaped on purpose: pre-norm blocks (RMSNorm), rotary positions, a SwiGLU
MLP and an output head tied to the token embedding. Only the attention layer
varies between experiments, so that loss differences are the attention's doing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nsa_lab.attention import build_attention
from nsa_lab.attention.rope import rope_tables


def ffn_width(d_model: int, ffn_hidden: int) -> int:
    """SwiGLU width: the explicit value, or 8/3 * d_model rounded up to a multiple of 64."""
    if ffn_hidden > 0:
        return ffn_hidden
    return 64 * math.ceil(8 * d_model / 3 / 64)


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, model_cfg, attn_cfg) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(model_cfg.d_model)
        self.attn = build_attention(model_cfg, attn_cfg)
        self.mlp_norm = nn.RMSNorm(model_cfg.d_model)
        self.mlp = SwiGLU(model_cfg.d_model, ffn_width(model_cfg.d_model, model_cfg.ffn_hidden))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class GQATransformer(nn.Module):
    """Token ids ``[B, T]`` -> next-token logits ``[B, T, vocab]``."""

    def __init__(self, model_cfg, attn_cfg, vocab_size: int) -> None:
        super().__init__()
        self.max_seq_len = model_cfg.max_seq_len
        self.head_dim = model_cfg.head_dim
        self.rope_theta = model_cfg.rope_theta
        self.embed = nn.Embedding(vocab_size, model_cfg.d_model)
        self.blocks = nn.ModuleList(Block(model_cfg, attn_cfg) for _ in range(model_cfg.n_layers))
        self.norm = nn.RMSNorm(model_cfg.d_model)
        self.head = nn.Linear(model_cfg.d_model, vocab_size, bias=False)
        self.head.weight = self.embed.weight  # weight tying
        self.apply(self._init_weights)
        # GPT-2's scaled init of residual output projections keeps the residual
        # stream's variance independent of depth.
        residual_std = 0.02 / math.sqrt(2 * model_cfg.n_layers)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down.weight")):
                nn.init.normal_(p, mean=0.0, std=residual_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, last_positions: int | None = None) -> torch.Tensor:
        """Logits ``[B, T, vocab]``, or ``[B, last_positions, vocab]`` for the last positions.

        Evaluation reads a few positions of long prompts; the logits of every position,
        ``B * T * vocab`` values, grow with the vocabulary (4 GiB in bf16 for a batch of
        65k tokens at a 32k-entry BPE vocabulary) and are not needed.
        """
        T = idx.shape[1]
        if self.max_seq_len < T:
            raise ValueError(f"sequence length {T} exceeds model.max_seq_len={self.max_seq_len}")
        x = self.embed(idx)
        cos, sin = rope_tables(self.head_dim, T, self.rope_theta, x.device, x.dtype)
        for block in self.blocks:
            x = block(x, cos, sin)
        if last_positions is not None:
            if not 1 <= last_positions <= T:
                raise ValueError(f"last_positions={last_positions} must be in 1..{T}")
            x = x[:, T - last_positions :]
        return self.head(self.norm(x))

    def gate_means(self) -> dict[str, float]:
        """Mean NSA branch gates of the last forward, keyed ``layer{i}/{branch}``."""
        out: dict[str, float] = {}
        for i, block in enumerate(self.blocks):
            for branch, value in getattr(block.attn, "last_gate_means", {}).items():
                out[f"layer{i}/{branch}"] = value
        return out

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
