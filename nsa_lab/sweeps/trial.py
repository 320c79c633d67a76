"""One trial, as the objective of ``study.optimize``: check, train as a child run, score.

A trial claimed once the budget was full (or its grid point was taken) ends FAIL as
``surplus``, and a config that breaks a rule ends PRUNED as ``rejected`` (PRUNED steers
TPE away from it); neither is trained. A trained trial ends ``complete``, ``pruned``
(the pruner stopped it on validation loss), ``nan`` (a NaN/inf validation loss, which
also stops training at once), ``crashed`` (any exception) or ``no_metric``; the last
three are FAIL. Outcome and reason are user attrs of the trial and tags of its child
run; Optuna tells the state.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import socket
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import lightning as L
import optuna
from omegaconf import DictConfig

from nsa_lab.config import ConfigError
from nsa_lab.models.flops import config_attended_tokens
from nsa_lab.sweeps.plan import SweepPlan, trial_config
from nsa_lab.sweeps.space import suggest
from nsa_lab.sweeps.spec import PRUNED_METRIC, SweepSpec
from nsa_lab.sweeps.study import claim_conflict
from nsa_lab.sweeps.tracking import SweepTracker

COST_METRIC = "cost/attended_tokens_per_query"


class TrialFailed(Exception):
    """Ends a trial FAIL whose outcome is already recorded (``optimize`` catches it)."""


class TrialReporter(L.Callback):
    """Tells Optuna the trial's run id and its validation loss; stops training when the
    pruner says so or the loss is not finite (no point training a diverged model)."""

    def __init__(self, trial: optuna.Trial, prune: bool) -> None:
        self.trial, self.prune = trial, prune
        self.run_id: str | None = None  # a retried trial still carries its original's
        self.stopped: tuple[str, int, float] | None = None  # (why, step, val loss)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and trainer.logger is not None:
            self.run_id = trainer.logger.run_id
            self.trial.set_user_attr("mlflow_run_id", self.run_id)

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
    trial: optuna.Trial,
    study: optuna.Study,
    plan: SweepPlan,
    tracker: SweepTracker,
    parent_id: str,
) -> list[float]:
    """The objective: the trial's objective values, or TrialPruned / TrialFailed."""
    spec = plan.spec
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    conflict = claim_conflict(study.get_trials(deepcopy=False), trial.number, plan)
    if conflict is not None:
        _end(trial, {}, "surplus", f"{conflict}; never trained")
    params = suggest(trial, spec.space)
    try:
        cfg = trial_config(spec, params)
    except ConfigError as exc:
        _end(trial, params, "rejected", str(exc))
    prepare_trial_config(cfg, spec, trial.number)
    reporter = TrialReporter(trial, prune=spec.pruner["type"] != "none")
    # heavy: only once a trial really trains
    from nsa_lab.evaluation.callback import needle_eval_callbacks
    from nsa_lab.training.run import train

    try:
        result = train(
            cfg,
            callbacks=[reporter, *needle_eval_callbacks(cfg)],
            tags=tracker.child_tags(spec, parent_id, trial.number),
        )
    except (KeyboardInterrupt, SystemExit) as exc:
        reason = "interrupted (Ctrl-C or SIGTERM); redone on the next run"
        _tag_run(reporter, tracker, "interrupted", reason, {})
        _record(trial, params, "interrupted", reason)
        raise KeyboardInterrupt from exc  # Optuna fails the trial on it, then re-raises
    except Exception as exc:
        traceback.print_exc()
        outcome, reason, values = "crashed", f"{type(exc).__name__}: {exc}", None
    else:
        outcome, reason, values = _score(spec, cfg, reporter, tracker, result.run_id)
    finally:
        if not spec.keep_checkpoints:
            _remove_checkpoints(Path(cfg.train.ckpt_dir), cfg.tracking.run_name)
    _tag_run(reporter, tracker, outcome, reason, {COST_METRIC: config_attended_tokens(cfg)})
    if values is None:
        _end(trial, params, outcome, reason)
    _record(trial, params, outcome, reason, values)
    return values


def _tag_run(
    reporter: TrialReporter, tracker: SweepTracker, outcome: str, reason: str, metrics: dict
) -> None:
    """Outcome, reason and extra metrics on the trial's child run, if training created one."""
    if reporter.run_id is not None:
        tracker.trial_ended(reporter.run_id, outcome, reason, metrics)


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


def _record(
    trial: optuna.Trial,
    params: dict,
    outcome: str,
    reason: str,
    values: Sequence[float] | None = None,
) -> None:
    """Outcome and reason as user attrs, and one line on stdout."""
    trial.set_user_attr("outcome", outcome)
    if reason:
        trial.set_user_attr("reason", reason)
    shown = " ".join(f"{k}={v}" for k, v in params.items())
    result = ", ".join(f"{v:.4g}" for v in values) if values else reason
    print(f"sweep: trial {trial.number} {outcome} [{shown}] {result}", flush=True)


def _end(trial: optuna.Trial, params: dict, outcome: str, reason: str) -> NoReturn:
    """Record an outcome without values and end the trial: PRUNED for the pruner and for
    rejected configs, FAIL for the rest."""
    _record(trial, params, outcome, reason)
    if outcome in ("pruned", "rejected"):
        raise optuna.TrialPruned(reason)
    raise TrialFailed(f"{outcome}: {reason}")
