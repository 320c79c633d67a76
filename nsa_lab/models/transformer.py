"""A small decoder-only GQA transformer whose attention comes from the registry.

nanoGPT-shaped on purpose: pre-norm blocks (RMSNorm), rotary positions, a SwiGLU
MLP and an output head tied to the token embedding. Only the attention layer
varies between experiments, so that loss differences are the attention's doing.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from nsa_lab.attention import build_attention
from nsa_lab.attention.cache import LayerCache
from nsa_lab.attention.rope import rope_tables
from nsa_lab.models.sampling import next_token


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

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LayerCache | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, cache)
        return x + self.mlp(self.mlp_norm(x))


class ModelCache:
    """Every layer's KV cache, the rotary tables of all positions, and the length so far."""

    def __init__(self, layers: list[LayerCache], cos: torch.Tensor, sin: torch.Tensor) -> None:
        self.layers, self.cos, self.sin = layers, cos, sin
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.cos.shape[0]

    def nbytes(self) -> int:
        """Bytes the layers' caches hold now (per batch, all sequences together)."""
        return sum(layer.nbytes() for layer in self.layers)


class GQATransformer(nn.Module):
    """Token ids ``[B, T]`` -> next-token logits ``[B, T, vocab]``."""

    def __init__(self, model_cfg, attn_cfg, vocab_size: int) -> None:
        super().__init__()
        self.max_seq_len = model_cfg.max_seq_len
        self.embed = nn.Embedding(vocab_size, model_cfg.d_model)
        self.blocks = nn.ModuleList(Block(model_cfg, attn_cfg) for _ in range(model_cfg.n_layers))
        self.norm = nn.RMSNorm(model_cfg.d_model)
        self.head = nn.Linear(model_cfg.d_model, vocab_size, bias=False)
        self.head.weight = self.embed.weight  # weight tying
        # Rotary tables of every position, built once in the parameters' dtype. Computed
        # inside each forward, a compiled graph fuses the float64 trigonometry into every
        # layer's rotation and recomputes it per element (a tenth of a compiled 8k step).
        # Non-persistent: they move and cast with the model but stay out of checkpoints.
        cos, sin = rope_tables(
            model_cfg.head_dim,
            self.max_seq_len,
            model_cfg.rope_theta,
            "cpu",
            torch.get_default_dtype(),
        )
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
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

    def forward(
        self,
        idx: torch.Tensor,
        last_positions: int | None = None,
        cache: ModelCache | None = None,
    ) -> torch.Tensor:
        """Logits ``[B, T, vocab]``, or ``[B, last_positions, vocab]`` for the last positions.

        With ``cache`` (from :meth:`new_cache`), ``idx`` continues what the cache has seen:
        first the prompt, then one token per call (see :meth:`generate`).

        Evaluation reads a few positions of long prompts; the logits of every position,
        ``B * T * vocab`` values, grow with the vocabulary (4 GiB in bf16 for a batch of
        65k tokens at a 32k-entry BPE vocabulary) and are not needed.
        """
        T = idx.shape[1]
        if self.max_seq_len < T:
            raise ValueError(f"sequence length {T} exceeds model.max_seq_len={self.max_seq_len}")
        x = self.embed(idx)
        if cache is None:
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]
            for block in self.blocks:
                x = block(x, cos, sin)
        else:
            start = cache.length
            if start + T > cache.max_len:
                raise ValueError(f"{start + T} positions exceed the cache's {cache.max_len}")
            cos, sin = cache.cos[start : start + T], cache.sin[start : start + T]
            for block, layer_cache in zip(self.blocks, cache.layers, strict=True):
                x = block(x, cos, sin, layer_cache)
            cache.length += T
        if last_positions is not None:
            if not 1 <= last_positions <= T:
                raise ValueError(f"last_positions={last_positions} must be in 1..{T}")
            x = x[:, T - last_positions :]
        return self.head(self.norm(x))

    def new_cache(self, max_len: int, device: torch.device | str, dtype: torch.dtype) -> ModelCache:
        """Empty KV caches for sequences of up to ``max_len`` positions (prompt included).

        ``dtype`` is that of the rotary tables, the model's parameter dtype.
        """
        if not 1 <= max_len <= self.max_seq_len:
            raise ValueError(
                f"max_len={max_len} must be in 1..model.max_seq_len={self.max_seq_len}"
            )
        layers = [block.attn.new_cache(max_len) for block in self.blocks]
        cos, sin = (table[:max_len].to(device, dtype) for table in (self.rope_cos, self.rope_sin))
        return ModelCache(layers, cos, sin)

    @torch.no_grad()
    def generate(
        self,
        prompt: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Iterator[torch.Tensor]:
        """Yields ``max_new_tokens`` tokens ``[B]`` one at a time after ``prompt [B, T]``.

        The prompt runs once through the training path and fills the KV caches
        (prefill); each new token is then one cached step. ``temperature=0`` is greedy;
        otherwise softmax sampling at that temperature, over the ``top_k`` most likely
        tokens when given.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
        param = next(self.parameters())
        cache = self.new_cache(prompt.shape[1] + max_new_tokens, param.device, param.dtype)
        logits = self(prompt, last_positions=1, cache=cache)[:, -1]
        for step in range(max_new_tokens):
            token = next_token(logits, temperature, top_k, generator)
            yield token
            if step + 1 < max_new_tokens:
                logits = self(token[:, None], cache=cache)[:, -1]

    def gate_means(self) -> dict[str, float]:
        """Mean NSA branch gates of the last forward, keyed ``layer{i}/{branch}``."""
        out: dict[str, float] = {}
        for i, block in enumerate(self.blocks):
            for branch, value in getattr(block.attn, "last_gate_means", {}).items():
                out[f"layer{i}/{branch}"] = value
        return out

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
