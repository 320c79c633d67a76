"""Training callbacks and checkpoint I/O that the trainer wires in."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO

from nsa_lab.files import write_atomic
from nsa_lab.training import rank_watchdog
from nsa_lab.training.efficiency import GIB, device_peak_flops, model_flops_utilization

PEAK_MEM_METRIC = "train/peak_mem_gib"


def writes_logs(steps_taken: int, log_every: int) -> bool:
    """Whether Lightning writes logged values to the logger once ``steps_taken`` steps are done.

    It writes when ``steps_taken`` is a multiple of ``log_every_n_steps``; a value logged
    during any other step is overwritten before it is written, so every step-wise metric
    must be logged on these steps.
    """
    return steps_taken % log_every == 0


class OptimizerStepWatch:
    """Tells, at a batch's end, whether it completed an optimizer step whose logs are written.

    With ``train.accumulate = k`` a step spans k micro-batches; only the last one moves
    ``global_step``, and only then does Lightning write what was logged.
    """

    def __init__(self, log_every: int) -> None:
        self.log_every = log_every
        self._seen_step = 0

    def start(self, trainer: L.Trainer) -> None:
        """Call at fit start: a resumed run starts at its checkpoint's step."""
        self._seen_step = trainer.global_step

    def logs_now(self, trainer: L.Trainer) -> bool:
        stepped = trainer.global_step != self._seen_step
        self._seen_step = trainer.global_step
        return stepped and writes_logs(trainer.global_step, self.log_every)


class TokenThroughput(L.Callback):
    """Logs ``train/tokens_per_s`` (all ranks' tokens, every micro-batch's) over each
    ``log_every`` window, and ``train/mfu`` where the GPU's peak is known.

    Measured between batch ends, so data loading and the optimizer step count:
    it is the throughput a researcher actually gets, not the model's forward alone.
    ``flops_per_token`` maps a sequence length to training FLOPs per token, so batches
    of a context-length curriculum count at their own length.
    """

    def __init__(self, log_every: int, flops_per_token: Callable[[int], float]) -> None:
        self.watch = OptimizerStepWatch(log_every)
        self.flops_per_token = flops_per_token
        self.peak_flops: float | None = None
        self._t0: float | None = None
        self._tokens = 0
        self._flops = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.watch.start(trainer)
        self.peak_flops = device_peak_flops(pl_module.device)

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        inputs = batch[0]
        tokens = inputs.numel() * trainer.world_size
        self._tokens += tokens
        self._flops += tokens * self.flops_per_token(inputs.shape[-1])
        now = time.perf_counter()
        logs_now = self.watch.logs_now(trainer)
        if self._t0 is None:  # the first batch pays for compilation and warm-up
            self._restart(now)
        elif logs_now and now > self._t0:
            self._log(pl_module, now - self._t0, trainer.world_size)
            self._restart(now)

    def _restart(self, now: float) -> None:
        self._t0, self._tokens, self._flops = now, 0, 0.0

    def _log(self, pl_module: L.LightningModule, seconds: float, devices: int) -> None:
        tokens_per_s = self._tokens / seconds
        pl_module.log("train/tokens_per_s", tokens_per_s, prog_bar=True, rank_zero_only=True)
        if self.peak_flops is not None and self._tokens:
            mfu = model_flops_utilization(
                self._flops / self._tokens, tokens_per_s, self.peak_flops, devices
            )
            pl_module.log("train/mfu", mfu, rank_zero_only=True)


class PeakMemory(L.Callback):
    """Logs ``train/peak_mem_gib``, the GPU memory high-water mark
    (``torch.cuda.max_memory_allocated``) of the rank that holds the most (one all-reduce
    over ranks), on the log steps and once more at the end of training, so the run's last
    value is its peak. Nothing on a CPU."""

    def __init__(self, log_every: int) -> None:
        self.watch = OptimizerStepWatch(log_every)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.watch.start(trainer)

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self.watch.logs_now(trainer) and pl_module.device.type == "cuda":
            pl_module.log(PEAK_MEM_METRIC, _highest_peak(trainer, pl_module), rank_zero_only=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.device.type != "cuda":
            return
        peak = _highest_peak(trainer, pl_module)  # every rank takes part
        if trainer.is_global_zero and trainer.logger:
            trainer.logger.log_metrics({PEAK_MEM_METRIC: peak}, step=trainer.global_step)


def _highest_peak(trainer: L.Trainer, pl_module: L.LightningModule) -> float:
    """The largest :func:`peak_mem_gib` of all ranks (a collective: every rank calls it)."""
    mine = torch.tensor(peak_mem_gib(pl_module.device), device=pl_module.device)
    return float(trainer.strategy.reduce(mine, reduce_op="max"))


def peak_mem_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / GIB


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

    With several processes saving is collective (a barrier; FSDP gathers the shards): it
    works when every rank raises at the same point (Ctrl-C, SIGTERM, a failure every rank
    meets), and raises at once where a peer is gone over gloo. Where a peer is lost over
    NCCL, Lightning's launcher SIGKILLs every rank first (see :class:`RankWatchdog`), and a
    rank that raises alone leaves the others waiting up to ``train.dist_timeout_s``; such a
    run resumes from its periodic ``last.ckpt``.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        trainer.save_checkpoint(self.path, weights_only=False)  # full: resumable


class RankWatchdog(L.Callback):
    """Stops a multi-process run whose rank 0 vanished, and marks its MLflow run FAILED.

    When a rank is killed, Lightning's launcher (a thread of rank 0) SIGKILLs every
    process within 5 s, rank 0 included, so rank 0 cannot mark its MLflow run FAILED
    itself; when rank 0 is killed, the other ranks wait in their next collective until
    ``train.dist_timeout_s``. This callback starts :mod:`nsa_lab.training.rank_watchdog`
    beside rank 0, once the process group is up (it learns the pids of the ranks on rank
    0's machine then). Should rank 0 vanish before :meth:`stop` (which ``train`` calls
    however training ended, having marked the run itself), the watchdog SIGKILLs the
    remaining local ranks and marks the run FAILED.

    Only rank 0 needs ``run_id``; with one process it does nothing.
    """

    def __init__(self, tracking_uri: str, run_id: str | None) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self._started = False
        self._proc: subprocess.Popen | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._started or trainer.world_size < 2:
            return
        self._started = True  # on every rank: the gather below is a collective
        me = (socket.gethostname(), os.getpid())
        ranks: list[Any] = [None] * trainer.world_size
        torch.distributed.all_gather_object(ranks, me)
        if trainer.is_global_zero and self.run_id is not None:
            others = [pid for host, pid in ranks if host == me[0] and pid != me[1]]
            self._proc = rank_watchdog.start(self.tracking_uri, self.run_id, others)

    def stop(self) -> None:
        """Training ended under rank 0's control (the run is marked): the watchdog exits."""
        if self._proc is not None:
            rank_watchdog.stop(self._proc)
            self._proc = None


class ProgressBar(TQDMProgressBar):
    """Lightning's bar, closed when training raises: Lightning leaves it open then, and
    the interpreter closes it at exit, printing a stale ``Epoch 0: 33%|...`` line after
    whatever the process printed last (pytest's summary, say)."""

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        for name in ("train_progress_bar", "val_progress_bar"):
            with contextlib.suppress(TypeError):  # Lightning's way of saying "no bar yet"
                getattr(self, name).close()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes to a temporary file and renames it, so a crash never leaves a torn checkpoint."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        save = super().save_checkpoint  # zero-argument super() does not work in a lambda
        write_atomic(Path(path), lambda tmp: save(checkpoint, tmp, storage_options))
