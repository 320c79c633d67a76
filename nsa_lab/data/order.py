"""The training loader, whose place in the data order a checkpoint keeps.

Lightning saves the ``state_dict()`` of every training loader that has one into the
checkpoint and, when a run resumes (``train.resume``), hands it to the new loader's
``load_state_dict()`` before iterating it. :class:`ResumableLoader` saves where in
the epoch's order training stands (a :class:`~nsa_lab.data.mix.ResumePoint`) and,
restored, makes its :class:`~nsa_lab.data.mix.EpochShuffle` skip the examples already
trained on, so the resumed run trains on exactly the batches the uninterrupted run
would have: the rest of the epoch, then the next epochs as usual.

"Trained on" is the trainer's count of batches whose step has finished
(:func:`batches_trained`), not the count the loader has handed out: a crash between
fetching a batch and stepping on it (where ``on_exception.ckpt`` is written) must
train that batch again after the resume, and batches that workers have prefetched
were never trained on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import lightning as L
from torch.utils.data import DataLoader, Dataset

from nsa_lab.data.mix import EpochShuffle, ResumePoint


class ResumableLoader(DataLoader):
    """A training loader over an :class:`EpochShuffle` that resumes at its next batch.

    ``batches_done`` tells how many batches of the current epoch this process has trained
    on (the trainer's count, see :func:`batches_trained`). Incomplete last batches are
    dropped, so that every process takes as many steps.
    """

    sampler: EpochShuffle

    def __init__(
        self,
        dataset: Dataset,
        sampler: EpochShuffle,
        batch_size: int,
        batches_done: Callable[[], int],
        **loader_options: Any,
    ) -> None:
        super().__init__(
            dataset, batch_size=batch_size, sampler=sampler, drop_last=True, **loader_options
        )
        self.batches_done = batches_done

    def state_dict(self) -> dict[str, int]:
        """Where training stands in the data order, for the checkpoint."""
        return asdict(self.sampler.reached(self.batches_done(), self.batch_size))

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Continue from a checkpoint's :meth:`state_dict` (before the loader is iterated)."""
        self.sampler.resume(ResumePoint(**state_dict), self.batch_size)


def batches_trained(trainer: L.Trainer | None) -> int:
    """Batches of the current epoch that ``trainer`` has finished a training step on.

    It is the count Lightning itself resumes from: after a crash it goes on with the
    first batch whose step had not finished, whatever was fetched or prefetched.
    """
    if trainer is None:
        raise RuntimeError("the training position is only known while a Trainer fits")
    return trainer.fit_loop.epoch_loop.batch_progress.current.processed


def data_parallel_share(trainer: L.Trainer | None) -> tuple[int, int]:
    """``(replicas, rank)``: how many processes split the training data, and which this is,
    as Lightning would split it (one process outside a trainer or a parallel strategy)."""
    split = (trainer.distributed_sampler_kwargs if trainer is not None else None) or {}
    return split.get("num_replicas", 1), split.get("rank", 0)
