"""Training callbacks and checkpoint I/O that the trainer wires in."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.plugins.io import TorchCheckpointIO


def writes_logs(steps_taken: int, log_every: int) -> bool:
    """Whether Lightning writes logged values to the logger once ``steps_taken`` steps are done.

    It writes when ``steps_taken`` is a multiple of ``log_every_n_steps``; a value logged
    during any other step is overwritten before it is written, so every step-wise metric
    must be logged on these steps.
    """
    return steps_taken % log_every == 0


class TokenThroughput(L.Callback):
    """Logs ``train/tokens_per_s`` (all ranks' tokens) over each ``log_every`` window.

    Measured between batch ends, so data loading and the optimizer step count:
    it is the throughput a researcher actually gets, not the model's forward alone.
    """

    def __init__(self, log_every: int) -> None:
        self.log_every = log_every
        self._t0: float | None = None
        self._tokens = 0

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        inputs = batch[0]
        self._tokens += inputs.numel() * trainer.world_size
        now = time.perf_counter()
        if self._t0 is None:  # the first step pays for compilation and warm-up
            self._t0, self._tokens = now, 0
            return
        if writes_logs(trainer.global_step, self.log_every) and now > self._t0:
            pl_module.log(
                "train/tokens_per_s",
                self._tokens / (now - self._t0),
                prog_bar=True,
                rank_zero_only=True,
            )
            self._t0, self._tokens = now, 0


class RunIdInCheckpoint(L.Callback):
    """Stores the MLflow run id in each checkpoint, so a resumed run logs to the same run."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint["mlflow_run_id"] = self.run_id


class CheckpointOnCrash(L.Callback):
    """Saves ``path`` when training raises (Ctrl-C included), for ``train.resume``.

    Lightning's own OnExceptionCheckpoint would also make every fresh ``fit``
    resume from ``last.ckpt`` if one exists; a fresh run must stay fresh.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        trainer.save_checkpoint(self.path)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes to a temporary file and renames it, so a crash never leaves a torn checkpoint."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        os.replace(tmp, path)
