"""The training stream: windows served short early in training, needle samples mixed in.

Two options change what a training window looks like, and both depend on where in
training a draw is served, which :class:`EpochShuffle` puts in the :class:`Draw` it
hands out (the pass over the data, or epoch, and whether the curriculum lasts):

* the context-length curriculum (``data.curriculum_seq_len``): during the first
  ``data.curriculum_steps`` optimizer steps each window is served as
  ``seq_len // curriculum_seq_len`` rows of the
  short length (the same tokens, so a step still trains on as many), afterwards
  whole. Small models learn in-context retrieval within hundreds of steps at a
  context of 128 tokens but not in thousands at 1024, and the skill carries over
  to the full length once it is there (docs/needle.md has the measurements);
* the needle mix (``data.needle_fraction``): each row is replaced, with that
  probability, by retrieval units built from its own text
  (:func:`~nsa_lab.data.needle.training_sample`).

Everything is a function of ``(seed, draw)``, so the stream is the same on every
run with that seed, each epoch brings new needles, and data-loader workers need
no shared state. The order is a function of ``(seed, epoch)`` (:class:`EpochShuffle`,
used with or without the mix), which is what lets a run resume at its very next
batch (:mod:`nsa_lab.data.order` keeps the position in the checkpoint).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler

from nsa_lab.data.needle import OVERHEAD_TOKENS, TRAIN_STREAM, stream_rng, training_sample

if TYPE_CHECKING:  # the data module imports this module to build its training set
    from nsa_lab.data.datamodule import PackedExamples

ORDER_STREAM = 0x0DE  # the shuffling's random stream (see needle.stream_rng)
MIN_UNIT_HAYSTACK = 16  # haystack tokens of the shortest retrieval unit in training


class TrainingMix(Dataset[tuple[Tensor, Tensor]]):
    """Training examples with the curriculum and the needle mix applied.

    It is indexed by :class:`Draw`: ``draw.index`` runs past ``len(base)`` (index ``g`` is
    draw ``g // n``, the epoch, of base example ``g % n``, see :class:`EpochShuffle`) and
    ``draw.short`` says whether the curriculum still lasts. An example is a pair of
    ``[seq_len]`` tensors, or of ``[rows, short_len]`` tensors during the curriculum; the
    training step flattens the rows into the batch. The config checks that ``short_len``
    divides ``seq_len`` and that rows hold a needle sample.
    """

    def __init__(
        self,
        base: PackedExamples,
        needle_fraction: float,
        seed: int,
        short_len: int = 0,
    ) -> None:
        self.base = base
        self.needle_fraction = needle_fraction
        self.seed = seed
        self.short_len = short_len

    def __len__(self) -> int:
        return len(self.base)

    def row_len(self, short: bool) -> int:
        """The context length served during the curriculum (``short``) or after it."""
        return self.short_len if short and self.short_len else self.base.seq_len

    def __getitem__(self, draw: Draw | int) -> tuple[Tensor, Tensor]:
        """The example of ``draw``; a plain index is a draw served after the curriculum."""
        index, short = draw if isinstance(draw, Draw) else (draw, False)
        inputs, targets = self.base[index % len(self.base)]
        window = torch.cat([inputs, targets[-1:]])
        row_len = self.row_len(short)
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


class Draw(NamedTuple):
    """What :class:`EpochShuffle` hands :class:`TrainingMix`: which draw of which example
    (``index``, see :class:`TrainingMix`) and whether the curriculum still lasts."""

    index: int
    short: bool


@dataclass(frozen=True)
class ResumePoint:
    """Where in the training order a run stands.

    ``position`` counts the examples of epoch ``epoch``'s order that all processes together
    have consumed, so a run can resume on another number of processes or batch size;
    ``batches`` is how many batches each process had trained on in that epoch, the count the
    trainer goes on from.
    """

    epoch: int
    position: int
    batches: int


class EpochShuffle(DistributedSampler[int]):
    """One process's share of a seeded permutation of ``range(n)`` per epoch, resumable
    mid-epoch.

    Epoch ``e``'s order is drawn from ``(seed, e)`` alone, so any epoch can be recomputed on
    its own. Process ``rank`` of ``replicas`` takes the order's positions ``rank``,
    ``rank + replicas``, ..., wrapping round to the start so that every process gets
    ``ceil(n / replicas)`` examples, as torch's ``DistributedSampler`` pads. Being one,
    Lightning leaves it in place under DDP instead of wrapping it, so the split is ours and
    :meth:`resume` can start every process at its own next example of the epoch: the
    consumed positions are skipped as indices, and no skipped example is ever loaded.

    Lightning calls :meth:`set_epoch` before each epoch. With ``tag_epoch`` (for
    :class:`TrainingMix`) it hands out :class:`Draw` s: indices offset by ``epoch * n``, so
    the mix sees which draw of an example it serves, and marked short while this process
    has served fewer than ``short_batches`` batches of ``batch_size`` since training began
    (the curriculum; counted in batches, so it ends at a step, not at an epoch's end: one
    epoch of a large corpus can outlast a whole run).
    """

    def __init__(
        self,
        n: int,
        seed: int,
        replicas: int = 1,
        rank: int = 0,
        tag_epoch: bool = True,
        batch_size: int = 1,
        short_batches: int = 0,
    ) -> None:
        super().__init__(range(n), num_replicas=replicas, rank=rank, shuffle=True, seed=seed)
        self.n = n
        self.tag_epoch = tag_epoch
        self.batch_size = batch_size
        self.short_batches = short_batches
        self.resumed_at = ResumePoint(epoch=0, position=0, batches=0)

    def resume(self, point: ResumePoint, batch_size: int) -> None:
        """Serve ``point.epoch`` from ``point.position`` of its order on.

        An epoch that has no full batch of ``batch_size`` left for this process is over, and
        the next one is served from its start: the epoch is set here, before the loader draws
        indices (which, with workers, it does as soon as it is iterated).
        """
        if self.examples_from(point.position) < batch_size:
            point = ResumePoint(epoch=point.epoch + 1, position=0, batches=0)
        self.resumed_at = point
        self.set_epoch(point.epoch)

    def reached(self, batches: int, batch_size: int) -> ResumePoint:
        """Where the current epoch stands once this process has trained on ``batches`` batches
        of ``batch_size`` in it (counted from the epoch's beginning, resumed ones included)."""
        start = self.start
        consumed = (batches - start.batches) * batch_size * self.num_replicas
        return ResumePoint(epoch=self.epoch, position=start.position + consumed, batches=batches)

    @property
    def start(self) -> ResumePoint:
        """Where the current epoch started: its resume point, or its beginning."""
        if self.resumed_at.epoch == self.epoch:
            return self.resumed_at
        return ResumePoint(epoch=self.epoch, position=0, batches=0)

    def examples_from(self, position: int) -> int:
        """Examples this process draws in an epoch served from ``position`` on."""
        return max(0, math.ceil((self.n - position) / self.num_replicas))

    def __iter__(self) -> Iterator[int] | Iterator[Draw]:
        order = stream_rng(ORDER_STREAM, self.seed, self.epoch).permutation(self.n)
        start = self.start
        draws = np.arange(self.examples_from(start.position))
        indices = order[(start.position + self.rank + self.num_replicas * draws) % self.n]
        if not self.tag_epoch:
            return iter(indices.tolist())
        batches_per_epoch = self.examples_from(0) // self.batch_size
        batch = self.epoch * batches_per_epoch + start.batches + draws // self.batch_size
        short = batch < self.short_batches
        indices += self.epoch * self.n
        return iter(map(Draw, indices.tolist(), short.tolist()))
