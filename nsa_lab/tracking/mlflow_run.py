"""MLflow bookkeeping for a training run: logger, params, tags, artifacts, status."""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from pathlib import Path

from filelock import FileLock
from lightning.pytorch.loggers import MLFlowLogger
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from nsa_lab.config import flatten, sqlite_path, to_yaml
from nsa_lab.tracking.loss_by_position import logged_losses_by_position
from nsa_lab.tracking.plots import plot_loss_by_position, plot_loss_curves

# What an MLflow run id looks like: lets the CLI tell a run id from a path or a name.
RUN_ID = re.compile(r"^[0-9a-f]{32}$")
# The run tag holding the absolute path of the run's last.ckpt, set by `nsa-lab train`, so
# that `nsa-lab eval needle RUN_ID` finds the weights.
CHECKPOINT_TAG = "checkpoint"


def git_commit() -> str:
    """HEAD of the working directory's repo (``+dirty`` if it has changes), else ``unknown``."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=5
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def artifact_location(uri: str) -> str | None:
    """Artifacts beside a SQLite store (``<db dir>/mlartifacts``), not in the process's cwd."""
    db = sqlite_path(uri)
    return None if db is None else (db.resolve().parent / "mlartifacts").as_uri()


def open_store(uri: str, experiment: str) -> None:
    """Create the store's schema and ``experiment`` once, under a lock for a SQLite file.

    Several trainings started together on a new SQLite store (one per GPU, say) would each
    create its tables and the experiment, and all but one fail (``index ... already
    exists``); the first one to hold the lock creates them, the others find them.
    """
    db = sqlite_path(uri)
    with nullcontext() if db is None else FileLock(f"{db}.lock"):
        client = MlflowClient(tracking_uri=uri)
        if client.get_experiment_by_name(experiment) is None:
            client.create_experiment(experiment, artifact_location=artifact_location(uri))


def make_logger(
    cfg: DictConfig, run_id: str | None = None, tags: Mapping[str, str] | None = None
) -> MLFlowLogger:
    """An MLflow logger for ``cfg``; ``run_id`` continues an existing run (resume)."""
    open_store(cfg.tracking.uri, cfg.tracking.experiment)
    return MLFlowLogger(
        experiment_name=cfg.tracking.experiment,
        run_name=cfg.tracking.run_name,
        tracking_uri=cfg.tracking.uri,
        tags={"variant": cfg.attn.name, "git_commit": git_commit(), **(tags or {})},
        artifact_location=artifact_location(cfg.tracking.uri),
        run_id=run_id,
    )


def log_config(logger: MLFlowLogger, cfg: DictConfig, extra: dict[str, object]) -> None:
    """Flat params (``attn.l``...) plus the resolved YAML as ``config.yaml``.

    MLflow refuses to change a logged param, so a resumed run logs only the params it
    does not hold yet and keeps the values of its first start.
    """
    logged = logger.experiment.get_run(logger.run_id).data.params
    new = {k: v for k, v in {**flatten(cfg), **extra}.items() if k not in logged}
    if new:
        logger.log_hyperparams(new)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(to_yaml(cfg))
        logger.experiment.log_artifact(logger.run_id, str(path))


def log_loss_curves(client: MlflowClient, run_id: str) -> None:
    """The run's figures at the end of training: train and validation loss against step
    (``loss_curve.png``) and the last validation's loss by position (``loss_by_position.png``,
    when the run logged it)."""
    histories = {
        key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
        for key in ("train/loss", "val/loss")
    }
    _log_figure(client, run_id, "loss_curve.png", lambda p: plot_loss_curves({"": histories}, p))
    run = client.get_run(run_id)
    seq_len = run.data.params.get("data.seq_len")
    by_position = logged_losses_by_position(run.data.metrics, int(seq_len)) if seq_len else []
    if by_position:
        label = f"last validation (step {max(step for step, _ in histories['val/loss'])})"
        _log_figure(
            client,
            run_id,
            "loss_by_position.png",
            lambda p: plot_loss_by_position({label: by_position}, p),
        )


def _log_figure(client: MlflowClient, run_id: str, name: str, draw: Callable[[Path], None]) -> None:
    """Draw into ``name`` in a scratch folder and log it as a top-level artifact."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        draw(path)
        client.log_artifact(run_id, str(path))


def mark_running(client: MlflowClient, run_id: str) -> None:
    """A resumed run is running again (until :func:`finish` ends it once more)."""
    client.update_run(run_id, status="RUNNING")


def finish(client: MlflowClient, run_id: str, ok: bool) -> None:
    client.set_terminated(run_id, status="FINISHED" if ok else "FAILED")
