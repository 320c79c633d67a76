"""The training stream: windows served short early in training, needle samples mixed in.

Two options change what a training window looks like, and both depend on which
pass over the data (epoch) a draw belongs to, which :class:`EpochShuffle` puts in
the index it hands out:

* the context-length curriculum (``data.curriculum_seq_len``): during the first
  epochs each window is served as ``seq_len // curriculum_seq_len`` rows of the
  short length (the same tokens, so a step still trains on as many), afterwards
  whole. Small models learn in-context retrieval within hundreds of steps at a
  context of 128 tokens but not in thousands at 1024, and the skill carries over
  to the full length once it is there (docs/needle.md has the measurements);
* the needle mix (``data.needle_fraction``): each row is replaced, with that
  probability, by retrieval units built from its own text
  (:func:`~nsa_lab.data.needle.training_sample`).

Everything is a function of ``(seed, index)``, so the stream is the same on every
run with that seed, each epoch brings new needles, and data-loader workers need
no shared state.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from nsa_lab.data.needle import OVERHEAD_TOKENS, TRAIN_STREAM, stream_rng, training_sample

if TYPE_CHECKING:  # the data module imports this module to build its training set
    from nsa_lab.data.datamodule import PackedExamples

ORDER_STREAM = 0x0DE  # the shuffling's random stream (see needle.stream_rng)
MIN_UNIT_HAYSTACK = 16  # haystack tokens of the shortest retrieval unit in training


class TrainingMix(Dataset[tuple[Tensor, Tensor]]):
    """Training examples with the curriculum and the needle mix applied.

    Indices run past ``len(base)``: index ``g`` is draw ``g // n`` (the epoch, see
    :class:`EpochShuffle`) of base example ``g % n``. An example is a pair of
    ``[seq_len]`` tensors, or of ``[rows, short_len]`` tensors while the curriculum
    lasts (its first ``short_epochs`` epochs); the training step flattens the rows
    into the batch. The config checks that ``short_len`` divides ``seq_len`` and that
    rows hold a needle sample.
    """

    def __init__(
        self,
        base: PackedExamples,
        needle_fraction: float,
        seed: int,
        short_len: int = 0,
        short_epochs: int = 0,
    ) -> None:
        self.base = base
        self.needle_fraction = needle_fraction
        self.seed = seed
        self.short_len = short_len
        self.short_epochs = short_epochs

    def __len__(self) -> int:
        return len(self.base)

    def row_len(self, epoch: int) -> int:
        """The context length served in ``epoch``."""
        return self.short_len if epoch < self.short_epochs else self.base.seq_len

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        epoch, example = divmod(index, len(self.base))
        inputs, targets = self.base[example]
        window = torch.cat([inputs, targets[-1:]])
        row_len = self.row_len(epoch)
        rng = stream_rng(TRAIN_STREAM, self.seed, index)
        pieces = window.unfold(0, row_len + 1, row_len)  # consecutive rows share one token
        rows = torch.stack([self._mixed(row, rng) for row in pieces])
        if len(rows) == 1:
            rows = rows[0]
        return rows[..., :-1], rows[..., 1:]

    def _mixed(self, row: Tensor, rng: np.random.Generator) -> Tensor:
        """``row`` (inputs and last target), or, with probability ``needle_fraction``, its
        needle sample."""
        if self.needle_fraction == 0 or rng.random() >= self.needle_fraction:
            return row
        min_length = min(OVERHEAD_TOKENS + MIN_UNIT_HAYSTACK, len(row))
        return torch.from_numpy(training_sample(row.numpy(), rng, min_length))

    @property
    def seq_len(self) -> int:
        return self.base.seq_len

    @property
    def n_target_tokens(self) -> int:
        return self.base.n_target_tokens


def curriculum_epochs(steps: int, n_examples: int, batch_size: int, world_size: int) -> int:
    """Whole epochs that cover ``steps`` optimizer steps (the data changes at epoch ends).

    Each of ``world_size`` processes gets ``ceil(n / world_size)`` examples per epoch and
    drops its last incomplete batch, as Lightning's distributed sampler and the loader do.
    """
    if steps == 0:
        return 0
    steps_per_epoch = max(1, math.ceil(n_examples / world_size) // batch_size)
    return math.ceil(steps / steps_per_epoch)


class EpochShuffle(Sampler[int]):
    """A seeded permutation of ``range(n)`` per epoch, offset by ``epoch * n``.

    Lightning calls :meth:`set_epoch` before each epoch (directly, or through its
    distributed wrapper), so :class:`TrainingMix` sees which draw of an example it serves.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        order = stream_rng(ORDER_STREAM, self.seed, self.epoch).permutation(self.n)
        return iter((order + self.epoch * self.n).tolist())
