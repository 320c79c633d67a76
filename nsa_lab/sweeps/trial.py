"""One trial: sample, check the constraints, train as a child run, score, tell Optuna.

A trial whose config breaks a rule is told PRUNED with outcome ``rejected`` and the
rule as its ``reason``, and is never trained. A trained trial ends as ``complete``,
``pruned`` (the pruner stopped it on validation loss), ``nan`` (a NaN/inf validation
loss, which also stops training at once), ``crashed`` (any exception) or ``no_metric``;
the last three are FAIL with the reason kept as a user attr and a tag on the child run.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import traceback
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import optuna
from omegaconf import DictConfig
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from nsa_lab.config import ConfigError
from nsa_lab.sweeps.cost import config_attended_tokens
from nsa_lab.sweeps.plan import SweepPlan, trial_config
from nsa_lab.sweeps.space import suggest
from nsa_lab.sweeps.spec import PRUNED_METRIC, SweepSpec
from nsa_lab.sweeps.study import Heartbeat
from nsa_lab.sweeps.tracking import SweepTracker

COST_METRIC = "cost/attended_tokens_per_query"
_STATES = {"complete": TrialState.COMPLETE, "pruned": TrialState.PRUNED}
_STATES["rejected"] = TrialState.PRUNED  # never trained; PRUNED steers TPE away from it


class TrialReporter(L.Callback):
    """Tells Optuna the trial's run id and its validation loss; stops training when the
    pruner says so or the loss is not finite (no point training a diverged model)."""

    def __init__(self, trial: optuna.Trial, prune: bool) -> None:
        self.trial, self.prune = trial, prune
        self.stopped: tuple[str, int, float] | None = None  # (why, step, val loss)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and trainer.logger is not None:
            self.trial.set_user_attr("mlflow_run_id", trainer.logger.run_id)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        value = trainer.callback_metrics.get(PRUNED_METRIC)
        if trainer.sanity_checking or value is None or self.stopped is not None:
            return
        value, step = float(value), trainer.global_step
        if not math.isfinite(value):
            self._stop(trainer, "nan", step, value)
        elif self.prune:
            self.trial.report(value, step)
            if self.trial.should_prune():
                self._stop(trainer, "pruned", step, value)

    def _stop(self, trainer: L.Trainer, why: str, step: int, value: float) -> None:
        self.stopped = (why, step, value)
        trainer.should_stop = True


def prepare_trial_config(cfg: DictConfig, spec: SweepSpec, number: int) -> None:
    """What the sweep decides for every trial: experiment, run name, a fresh start, a
    per-study checkpoint folder, and one device (Lightning's ``auto`` would take all)."""
    cfg.tracking.experiment = spec.experiment
    cfg.tracking.run_name = f"{spec.study_name}-t{number:03d}"
    cfg.train.resume = "false"
    cfg.train.ckpt_dir = str(Path(cfg.train.ckpt_dir) / spec.study_name)
    if cfg.train.devices == "auto":
        cfg.train.devices = "1"


def run_trial(
    study: optuna.Study,
    trial: optuna.Trial,
    plan: SweepPlan,
    storage: RDBStorage,
    tracker: SweepTracker,
    parent_id: str,
) -> str:
    """Run one claimed trial to its end; returns its outcome."""
    spec = plan.spec
    params = suggest(trial, spec.space)
    try:
        cfg = trial_config(spec, params)
    except ConfigError as exc:
        return _end(study, trial, params, "rejected", str(exc))
    prepare_trial_config(cfg, spec, trial.number)
    reporter = TrialReporter(trial, prune=spec.pruner["type"] != "none")
    from nsa_lab.training.run import train  # heavy: only once a trial really trains

    try:
        with Heartbeat(storage, trial._trial_id):
            result = train(
                cfg, callbacks=[reporter], tags=tracker.child_tags(spec, parent_id, trial.number)
            )
    except (KeyboardInterrupt, SystemExit):
        reason = "interrupted (Ctrl-C or SIGTERM); redone on the next run"
        _tag_run(trial, tracker, "interrupted", reason, {})
        _end(study, trial, params, "interrupted", reason)
        raise
    except Exception as exc:
        traceback.print_exc()
        outcome, reason, values = "crashed", f"{type(exc).__name__}: {exc}", None
    else:
        outcome, reason, values = _score(spec, cfg, reporter, tracker, result.run_id)
    finally:
        if not spec.keep_checkpoints:
            _remove_checkpoints(Path(cfg.train.ckpt_dir), cfg.tracking.run_name)
    _tag_run(trial, tracker, outcome, reason, {COST_METRIC: config_attended_tokens(cfg)})
    return _end(study, trial, params, outcome, reason, values)


def _tag_run(
    trial: optuna.Trial, tracker: SweepTracker, outcome: str, reason: str, metrics: dict
) -> None:
    """Outcome, reason and extra metrics on the trial's child run, if training created one."""
    run_id = trial.user_attrs.get("mlflow_run_id")
    if run_id is not None:
        tracker.trial_ended(run_id, outcome, reason, metrics)


def _remove_checkpoints(study_dir: Path, run_name: str) -> None:
    """Drop the trial's checkpoints (and the study's folder once it is empty)."""
    shutil.rmtree(study_dir / run_name, ignore_errors=True)
    with contextlib.suppress(OSError):
        study_dir.rmdir()


def _score(
    spec: SweepSpec,
    cfg: DictConfig,
    reporter: TrialReporter,
    tracker: SweepTracker,
    run_id: str,
) -> tuple[str, str, list[float] | None]:
    if reporter.stopped is not None:
        why, step, value = reporter.stopped
        if why == "nan":
            return "nan", f"{PRUNED_METRIC} is {value} at step {step}", None
        return "pruned", f"pruned at step {step} ({PRUNED_METRIC} {value:.4f})", None
    logged = tracker.client.get_run(run_id).data.metrics
    values = []
    for objective in spec.objectives:
        derived = objective.derived
        value = config_attended_tokens(cfg) if derived else logged.get(objective.metric)
        if value is None:
            return "no_metric", f"the run logged no {objective.metric}", None
        if not math.isfinite(value):
            return "nan", f"{objective.metric} is {value}", None
        values.append(float(value))
    return "complete", "", values


def _end(
    study: optuna.Study,
    trial: optuna.Trial,
    params: dict,
    outcome: str,
    reason: str,
    values: Sequence[float] | None = None,
) -> str:
    trial.set_user_attr("outcome", outcome)
    if reason:
        trial.set_user_attr("reason", reason)
    state = _STATES.get(outcome, TrialState.FAIL)
    study.tell(trial, list(values) if state == TrialState.COMPLETE else None, state=state)
    shown = " ".join(f"{k}={v}" for k, v in params.items())
    result = ", ".join(f"{v:.4g}" for v in values) if values else reason
    print(f"sweep: trial {trial.number} {outcome} [{shown}] {result}", flush=True)
    return outcome
