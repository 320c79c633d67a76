"""Choosing the next token from logits: greedy, or sampled at a temperature over the top k."""

from __future__ import annotations

import torch


def next_token(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``logits [B, vocab]`` -> token ids ``[B]``.

    ``temperature=0``: the arg-max (ties to the lower id). Otherwise a draw from
    ``softmax(logits / temperature)``, restricted to the ``top_k`` largest logits when
    given; ``generator`` makes draws reproducible.
    """
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1")
    if temperature == 0:
        return logits.argmax(dim=-1)
    scaled = logits.float() / temperature
    if top_k is not None and top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
