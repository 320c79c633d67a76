"""``nsa-lab train``: wire config, data, model, MLflow and the Lightning Trainer together."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from functools import lru_cache, partial
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, Strategy
from omegaconf import DictConfig, OmegaConf
from torch.distributed.fsdp import MixedPrecision

from nsa_lab.config import RESUME_FRESH, RESUME_LATEST, ConfigError, parse_devices
from nsa_lab.data import NSADataModule, cache_dir_for
from nsa_lab.models.flops import training_flops_per_token
from nsa_lab.models.transformer import Block
from nsa_lab.tracking.mlflow_run import (
    CHECKPOINT_TAG,
    finish,
    log_config,
    log_loss_curves,
    make_logger,
    mark_running,
)
from nsa_lab.training.callbacks import (
    AtomicCheckpointIO,
    CheckpointOnCrash,
    PeakMemory,
    ProgressBar,
    RankWatchdog,
    RunIdInCheckpoint,
    TokenThroughput,
)
from nsa_lab.training.efficiency import check_compile, compile_model
from nsa_lab.training.module import LanguageModel


@dataclass
class TrainResult:
    """What a finished ``train`` returns (``run_id`` is None on ranks other than 0)."""

    run_id: str | None
    run_name: str
    checkpoint: Path
    val_loss: float
    global_step: int


def train(
    cfg: DictConfig,
    callbacks: Sequence[L.Callback] = (),
    tags: Mapping[str, str] | None = None,
) -> TrainResult:
    """Train ``cfg`` (already validated) and return where its run and checkpoint are.

    The MLflow run ends FINISHED, or FAILED on any exception or Ctrl-C; a crash
    leaves ``on_exception.ckpt`` beside the periodic ``last.ckpt`` for ``train.resume``.
    ``callbacks`` join the trainer's own (a sweep's pruning callback, say; the needle
    evaluation of ``train.eval_needle`` is the caller's to pass, see
    :func:`nsa_lab.evaluation.callback.needle_eval_callbacks`) and ``tags`` the run's
    (e.g. ``mlflow.parentRunId`` for a sweep trial).
    """
    check_compile(cfg.train.compile, cfg.train.strategy)
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    resume_path = resolve_resume(cfg)  # also fixes cfg.tracking.run_name
    data = NSADataModule(
        cfg.data,
        cfg.train.seed,
        accumulate=cfg.train.accumulate,
        cache_dir=cache_dir_for(cfg.data, cfg.tracking.uri),
        needle_haystack=cfg.train.eval_needle,
    )
    data.setup("fit")  # data errors surface before a run is created
    module = LanguageModel(OmegaConf.to_container(cfg, resolve=True), data.tokenizer.vocab_size)
    flops_per_token = lru_cache(partial(training_flops_per_token, module.model, cfg.attn))
    for length in served_lengths(cfg.data):
        # Counted now, from the whole model: under FSDP its weights become shards.
        flops_per_token(length)
    if cfg.train.compile:
        compile_model(module.model, mode=cfg.train.compile_mode)

    ckpt_dir = Path(cfg.train.ckpt_dir) / cfg.tracking.run_name
    # The checkpoint tag lets `nsa-lab eval needle RUN_ID` find the weights.
    run_tags = {CHECKPOINT_TAG: str((ckpt_dir / "last.ckpt").resolve()), **(tags or {})}
    logger = make_logger(cfg, run_id=_run_id_in(resume_path), tags=run_tags)
    trainer = _make_trainer(cfg, logger, ckpt_dir, callbacks, flops_per_token)
    # Only global rank 0 talks to MLflow (Lightning gives other ranks a no-op logger).
    run_id = logger.run_id if trainer.is_global_zero else None
    watchdog = RankWatchdog(cfg.tracking.uri, run_id)
    trainer.callbacks.append(watchdog)
    if trainer.is_global_zero:
        if resume_path is not None:
            mark_running(logger.experiment, run_id)  # the same run goes on
        log_config(
            logger,
            cfg,
            {
                "model.n_params": module.model.num_params(),
                "data.train_tokens": data.n_train_tokens,
                "model.flops_per_token": flops_per_token(cfg.data.seq_len),
                **data.corpus_stats.params(),
            },
        )
        trainer.callbacks.append(RunIdInCheckpoint(run_id))
    ok = False
    try:
        # Checkpoints hold tensors, plain containers and strings only (the config as a
        # plain dict), so resuming never unpickles arbitrary objects.
        trainer.fit(module, datamodule=data, ckpt_path=resume_path, weights_only=True)
        if trainer.global_step % cfg.train.val_every != 0:
            trainer.validate(module, datamodule=data, verbose=False)
            # A full checkpoint (optimizer, loops, callbacks), for train.resume; saying so
            # spares Lightning's "weights_only was not set" note. On a validation step the
            # periodic last.ckpt of this very step is already there, and must stay: resumed
            # from a checkpoint saved after `fit`, Lightning counts that step's validation
            # as one more step, so every later MLflow step would be off by one.
            trainer.save_checkpoint(ckpt_dir / "last.ckpt", weights_only=False)
        ok = True
    finally:
        if trainer.is_global_zero:
            if ok:
                log_loss_curves(logger.experiment, run_id)
            finish(logger.experiment, run_id, ok)
        watchdog.stop()
    return TrainResult(
        run_id=run_id,
        run_name=cfg.tracking.run_name,
        checkpoint=ckpt_dir / "last.ckpt",
        val_loss=float(trainer.callback_metrics.get("val/loss", float("nan"))),
        global_step=trainer.global_step,
    )


def newest_checkpoint(root: Path, pattern: str) -> Path | None:
    """The most recently written checkpoint matching ``pattern`` under ``root``, if any.

    Hidden files are checkpoints being written (see ``nsa_lab.files.write_atomic``).
    """
    found = sorted(
        (p for p in root.glob(pattern) if not p.name.startswith(".")),
        key=lambda p: p.stat().st_mtime,
    )
    return found[-1] if found else None


def resolve_resume(cfg: DictConfig) -> str | None:
    """The checkpoint ``train.resume`` points at (None for a fresh run); sets the run name.

    ``true`` takes the newest checkpoint of ``tracking.run_name`` (or of any run
    under ``train.ckpt_dir`` when no name is given); any other value is a path.
    """
    resume = str(cfg.train.resume)
    root = Path(cfg.train.ckpt_dir)
    if resume.lower() in RESUME_FRESH:
        if cfg.tracking.run_name is None:
            cfg.tracking.run_name = f"{cfg.attn.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        return None
    if resume.lower() in RESUME_LATEST:
        pattern = f"{cfg.tracking.run_name}/*.ckpt" if cfg.tracking.run_name else "*/*.ckpt"
        path = newest_checkpoint(root, pattern)
        if path is None:
            raise ConfigError(
                "train.resume", cfg.train.resume, f"no checkpoint matches {root / pattern}"
            )
    else:
        path = Path(resume)
        if not path.is_file():
            raise ConfigError(
                "train.resume", resume, "is neither true/false nor an existing checkpoint file"
            )
    cfg.tracking.run_name = path.parent.name
    return str(path)


def _run_id_in(ckpt_path: str | None) -> str | None:
    if ckpt_path is None:
        return None
    return torch.load(ckpt_path, map_location="cpu", weights_only=True).get("mlflow_run_id")


def _make_trainer(
    cfg: DictConfig,
    logger: MLFlowLogger,
    ckpt_dir: Path,
    extra_callbacks: Sequence[L.Callback],
    flops_per_token: Callable[[int], float],
) -> L.Trainer:
    """``max_steps`` counts optimizer steps, each of ``train.accumulate`` micro-batches;
    the LR schedule (interval ``step``) also moves once per optimizer step."""
    t = cfg.train
    return L.Trainer(
        max_steps=t.max_steps,
        accumulate_grad_batches=t.accumulate,
        accelerator=t.accelerator,
        devices=parse_devices(t.devices),
        num_nodes=t.num_nodes,
        strategy=make_strategy(t),
        precision=resolve_precision(t.precision, t.accelerator),
        gradient_clip_val=t.grad_clip or None,
        val_check_interval=t.val_every,
        check_val_every_n_epoch=None,
        limit_val_batches=t.val_batches,
        num_sanity_val_steps=0,
        log_every_n_steps=t.log_every,
        logger=logger,
        default_root_dir=str(ckpt_dir),
        plugins=[AtomicCheckpointIO()],
        callbacks=[
            ModelCheckpoint(
                dirpath=ckpt_dir, save_last=True, save_top_k=0, every_n_train_steps=t.val_every
            ),
            CheckpointOnCrash(ckpt_dir / "on_exception.ckpt"),
            # Refreshing on log steps only: every refresh reads the logged loss off the
            # GPU, which would make each step wait for the GPU to drain.
            ProgressBar(refresh_rate=t.log_every),
            TokenThroughput(t.log_every, flops_per_token),
            PeakMemory(t.log_every),
            *extra_callbacks,
        ],
    )


def resolve_precision(precision: str, accelerator: str) -> str:
    """``auto``: bf16 autocast where a CUDA GPU supports it, full fp32 elsewhere."""
    if precision != "auto":
        return precision
    gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    if gpu and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def make_strategy(t: DictConfig) -> str | Strategy:
    """Lightning's strategy for ``train.strategy`` (``t`` is ``cfg.train``).

    ``ddp`` and ``fsdp`` wait ``train.dist_timeout_s`` for a silent rank. FSDP:

    - shards each transformer :class:`Block` on its own (and the embedding, final norm and
      tied head together at the root), so only one block's weights are whole at a time;
    - saves full (unsharded) checkpoints, so a run resumes on another device count or
      strategy;
    - keeps float32 weights under ``bf16-mixed``/``16-mixed`` and lets autocast compute
      in half precision, as DDP and one device do (Lightning's default would cast the
      weights, the residual stream and the gradient reductions to half precision), so
      that FSDP trains the model the other strategies train.
    """
    timeout = timedelta(seconds=t.dist_timeout_s)
    if t.strategy == "ddp":
        return DDPStrategy(timeout=timeout)
    if t.strategy == "fsdp":
        mixed = "mixed" in resolve_precision(t.precision, t.accelerator)
        return FSDPStrategy(
            state_dict_type="full",
            auto_wrap_policy={Block},
            mixed_precision=MixedPrecision() if mixed else None,
            timeout=timeout,
        )
    return t.strategy


def served_lengths(data: DictConfig) -> list[int]:
    """The sequence lengths training batches come in: ``data.seq_len``, and the
    curriculum's shorter rows while it lasts."""
    return [data.seq_len] + ([data.curriculum_seq_len] if data.curriculum_seq_len else [])
