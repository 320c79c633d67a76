"""KV caches for decoding: what each attention layer keeps between steps.

A layer's :class:`LayerCache` holds named :class:`KVBuffer` s (rotated keys and values
of one projection) and, for NSA, the compressed blocks completed so far
(:class:`GrowingBuffer`). A buffer of capacity ``c`` stores position ``p`` at slot
``p % c``: with ``c`` at least the sequence it is a plain cache, with ``c = w`` it is a
sliding window's ring.
"""

from __future__ import annotations

import torch


class KVBuffer:
    """Keys and values ``[B, capacity, G, D]`` of one projection; allocated on first write,
    in the dtype and on the device of what is written."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def write(self, k: torch.Tensor, v: torch.Tensor | None, start: int) -> None:
        """Store ``k, v [B, T, G, D]`` as positions ``start .. start + T - 1``; a ring keeps
        only the last ``capacity`` of them. ``v=None``: keys only (NSA's scoring keys
        without the cmp branch have no values)."""
        length = k.shape[1]
        kept = min(length, self.capacity)
        slots = torch.arange(start + length - kept, start + length, device=k.device)
        slots = slots % self.capacity
        self.keys = self._stored(self.keys, k, slots, kept)
        if v is not None:
            self.values = self._stored(self.values, v, slots, kept)

    def _stored(
        self, buffer: torch.Tensor | None, x: torch.Tensor, slots: torch.Tensor, kept: int
    ) -> torch.Tensor:
        if buffer is None:
            buffer = x.new_empty(x.shape[0], self.capacity, *x.shape[2:])
        buffer[:, slots] = x[:, x.shape[1] - kept :]
        return buffer

    def upto(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions ``0 .. t`` (needs a capacity beyond ``t``: not a ring)."""
        if t >= self.capacity:
            raise ValueError(f"position {t} is not kept by a buffer of {self.capacity}")
        return self._rows(slice(0, t + 1))

    def window(self, t: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions ``max(0, t-w+1) .. t`` in position order (``t``: the last one written)."""
        first = max(0, t - w + 1)
        if t - first + 1 > self.capacity:
            raise ValueError(f"a window of {w} is not kept by a buffer of {self.capacity}")
        if t < self.capacity:  # nothing overwritten yet: positions sit at their own slots
            return self._rows(slice(first, t + 1))
        return self._rows(torch.arange(first, t + 1, device=self.keys.device) % self.capacity)

    def _rows(self, index: slice | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        values = None if self.values is None else self.values[:, index]
        return self.keys[:, index], values

    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in (self.keys, self.values) if x is not None)


class GrowingBuffer:
    """Rows appended along dim 1 (NSA's compressed keys or values, one per finished block)."""

    def __init__(self) -> None:
        self.rows: torch.Tensor | None = None

    def append(self, x: torch.Tensor) -> None:
        self.rows = x if self.rows is None else torch.cat([self.rows, x], dim=1)

    def all(self, like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """Every row so far; none yet: an empty ``[B, 0, *shape]`` tensor like ``like``."""
        if self.rows is None:
            return like.new_empty(like.shape[0], 0, *shape)
        return self.rows

    def nbytes(self) -> int:
        return 0 if self.rows is None else self.rows.numel() * self.rows.element_size()


class LayerCache:
    """One attention layer's buffers and how many positions it has seen."""

    def __init__(self, **buffers: KVBuffer | GrowingBuffer) -> None:
        self.buffers = buffers
        self.length = 0

    def nbytes(self) -> int:
        return sum(buffer.nbytes() for buffer in self.buffers.values())
