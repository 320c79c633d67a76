"""Validation loss by position in the sequence: the buckets, their metric names, their means.

A sliding window of ``w`` tokens can only fall behind full attention on tokens that sit
more than ``w`` positions into the sequence, and the whole-sequence mean dilutes that
gap; the loss of each position bucket shows it. Buckets double in width (``0-512,
512-1k, 1k-2k, 2k-4k, 4k-8k`` at 8192 tokens), so each spans the same range of
log-position, and every context length gets five or six of them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise

import torch

METRIC_PREFIX = "val/loss_pos/"
# The first bucket ends at the largest power of two <= seq_len / FIRST_BUCKET_DIVISOR.
FIRST_BUCKET_DIVISOR = 16


@dataclass(frozen=True)
class PositionBucket:
    """Target positions ``start <= t < end`` of a validation window."""

    start: int
    end: int

    @property
    def label(self) -> str:
        """``512-1k``: ends in tokens, ``k`` for whole multiples of 1024."""
        return f"{tokens_label(self.start)}-{tokens_label(self.end)}"

    @property
    def metric(self) -> str:
        return METRIC_PREFIX + self.label

    @property
    def size(self) -> int:
        return self.end - self.start


def position_buckets(seq_len: int) -> tuple[PositionBucket, ...]:
    """``[0, f), [f, 2f), [2f, 4f), ..., [2^k f, seq_len)`` with ``f`` the largest power of
    two <= ``seq_len / 16`` (at least 1): 5 buckets at any power-of-two length >= 16,
    5 or 6 at any other."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    first = 1 << max(0, (seq_len // FIRST_BUCKET_DIVISOR).bit_length() - 1)
    edges = [0]
    edge = first
    while edge < seq_len:
        edges.append(edge)
        edge *= 2
    edges.append(seq_len)
    return tuple(PositionBucket(a, b) for a, b in pairwise(edges))


def bucket_means(losses: torch.Tensor, buckets: Sequence[PositionBucket]) -> torch.Tensor:
    """Token-mean of ``losses [B, T]`` over each bucket's positions of every row, ``[n]``."""
    return torch.stack([losses[:, b.start : b.end].mean() for b in buckets])


def logged_losses_by_position(
    metrics: Mapping[str, float], seq_len: int
) -> list[tuple[PositionBucket, float]]:
    """The bucket losses among a run's ``metrics`` (MLflow keeps the latest value of each,
    i.e. the last validation's), in position order; buckets not logged are left out."""
    return [(b, metrics[b.metric]) for b in position_buckets(seq_len) if b.metric in metrics]


def tokens_label(n: int) -> str:
    """``512``, ``1k``, ``1536``: a token count, in ``k`` when it is a multiple of 1024."""
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)
