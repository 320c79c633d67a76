"""Find and load what an evaluation runs on: a checkpoint, named directly or by its MLflow run.

``nsa-lab train`` tags every run with ``checkpoint``, the absolute path of its
``last.ckpt``; runs without the tag (older ones) are found from their logged
params, ``train.ckpt_dir/tracking.run_name/last.ckpt``, relative to the current
directory. Either way the checkpoint must carry the same ``mlflow_run_id``, so
that a newer run reusing the name is never mistaken for the one asked about.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from nsa_lab.config import ConfigError, TrackingConfig, sqlite_path
from nsa_lab.tracking.mlflow_run import CHECKPOINT_TAG, RUN_ID
from nsa_lab.training.module import LanguageModel

DEFAULT_TRACKING_URI = TrackingConfig.uri


@dataclass(frozen=True)
class LoadedRun:
    """A trained model with its resolved config and where its results should be logged."""

    module: LanguageModel
    cfg: DictConfig
    checkpoint: Path
    global_step: int
    run_id: str | None  # None: the checkpoint names no MLflow run
    tracking_uri: str  # where that run is (or would be) logged


def load_run(ref: str, tracking_uri: str | None = None) -> LoadedRun:
    """Load the model that ``ref`` (a checkpoint path or an MLflow run id) names, on the CPU.

    ``tracking_uri`` is where the run is: by default the store the checkpoint's
    own config logged to (for a path) or ``sqlite:///mlflow.db`` (for a run id).
    """
    path = Path(ref)
    if path.is_file():
        ckpt = _read_checkpoint(path, "RUN")
        uri = tracking_uri or ckpt["hyper_parameters"]["config"]["tracking"]["uri"]
        return _loaded(ckpt, path, ckpt.get("mlflow_run_id"), uri)
    if not RUN_ID.match(ref):
        raise ConfigError("RUN", ref, "is neither a checkpoint file nor an MLflow run id")
    uri = tracking_uri or DEFAULT_TRACKING_URI
    path = checkpoint_of_run(ref, uri)
    ckpt = _read_checkpoint(path, "RUN")
    owner = ckpt.get("mlflow_run_id")
    if owner is not None and owner != ref:
        raise ConfigError(
            "RUN", ref, f"its checkpoint {path} now belongs to run {owner} (name reused?)"
        )
    return _loaded(ckpt, path, ref, uri)


def checkpoint_of_run(run_id: str, tracking_uri: str) -> Path:
    """The ``last.ckpt`` of MLflow run ``run_id`` (see the module docstring for how)."""
    if (db := sqlite_path(tracking_uri)) is not None and not db.is_file():
        # Opening a SQLite store that does not exist would create an empty one.
        raise ConfigError(
            "RUN", run_id, f"no such run: the tracking store {tracking_uri} does not exist"
        )
    try:
        run = MlflowClient(tracking_uri=tracking_uri).get_run(run_id)
    except MlflowException as exc:
        raise ConfigError(
            "RUN", run_id, f"no such run in the tracking store {tracking_uri}"
        ) from exc
    tagged = run.data.tags.get(CHECKPOINT_TAG)
    params = run.data.params
    candidates = [Path(tagged)] if tagged else []
    if "train.ckpt_dir" in params and "tracking.run_name" in params:
        run_dir = Path(params["train.ckpt_dir"]) / params["tracking.run_name"]
        candidates.append(run_dir / "last.ckpt")
    for path in candidates:
        if path.is_file():
            return path
    tried = ", ".join(str(p) for p in candidates) or "no checkpoint tag or params"
    raise ConfigError("RUN", run_id, f"its checkpoint is not found (tried: {tried})")


def _read_checkpoint(path: Path, key: str) -> dict[str, Any]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a torn or foreign file: say which and why
        raise ConfigError(key, str(path), f"cannot be read as a checkpoint: {exc}") from exc
    if not isinstance(ckpt, dict) or "hyper_parameters" not in ckpt or "state_dict" not in ckpt:
        raise ConfigError(key, str(path), "is not an nsa-lab training checkpoint")
    return ckpt


def _loaded(ckpt: dict[str, Any], path: Path, run_id: str | None, uri: str) -> LoadedRun:
    module = LanguageModel(**ckpt["hyper_parameters"])
    module.load_state_dict(ckpt["state_dict"])
    module.eval()
    cfg = OmegaConf.create(ckpt["hyper_parameters"]["config"])
    return LoadedRun(module, cfg, path, int(ckpt.get("global_step", 0)), run_id, uri)
