"""MLflow side of a sweep: one parent run per study, one child run per trained trial.

The parent run is created once, by the first process that opens the study, and its id
is kept as a study user attr, so re-runs and other workers log under the same parent.
Child runs are ordinary training runs (``nsa_lab.training.run.train``) with the tag
``mlflow.parentRunId``; their params are the trial's full flattened config, so the UI
filters them by any key (``params.attn.l = "32"``). When a sweep ends, the parent gets
the study-level artifacts (``study/``: plots and ``trials.csv``) and the best trial's
child run the tag ``best_trial=true`` (every other child ``false``).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path

import optuna
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial, TrialState

from nsa_lab.sweeps.plan import SweepPlan
from nsa_lab.sweeps.spec import SweepSpec
from nsa_lab.sweeps.study import PARENT_RUN_ATTR
from nsa_lab.sweeps.study_plots import write_study_artifacts
from nsa_lab.tracking.mlflow_run import artifact_location, git_commit

MAX_TAG = 4000  # MLflow tag values are bounded; reasons get cut to this


class SweepTracker:
    """MLflow bookkeeping for one study (safe to create in every worker process)."""

    def __init__(self, tracking_uri: str, experiment: str) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.client = MlflowClient(tracking_uri)

    def experiment_id(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            return found.experiment_id
        location = artifact_location(self.tracking_uri)
        return self.client.create_experiment(self.experiment, artifact_location=location)

    def parent_run(self, study: optuna.Study, plan: SweepPlan) -> str:
        """The study's parent run id (created on first use), set back to RUNNING."""
        run_id = study.user_attrs.get(PARENT_RUN_ATTR)
        if run_id is None:
            run_id = self._create_parent(plan.spec, plan)
            study.set_user_attr(PARENT_RUN_ATTR, run_id)
        self.client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        return run_id

    def _create_parent(self, spec: SweepSpec, plan: SweepPlan) -> str:
        run = self.client.create_run(
            self.experiment_id(),
            run_name=spec.study_name,
            tags={
                "sweep.kind": "study",
                "sweep.study": spec.study_name,
                "sweep.spec": str(spec.source),
                "git_commit": git_commit(),
            },
        )
        params = {
            "sweep.sampler": spec.sampler["type"],
            "sweep.pruner": spec.pruner["type"],
            "sweep.objectives": ", ".join(f"{o.metric} ({o.direction})" for o in spec.objectives),
            "sweep.trials": plan.n_trials,
            "sweep.base": ", ".join(Path(b).name for b in spec.base),
            "sweep.overrides": " ".join(spec.overrides) or "-",
            "sweep.constraints": "; ".join(c.text for c in spec.constraints) or "-",
            **{f"space.{p.key}": p.describe() for p in spec.space},
        }
        for key, value in params.items():
            self.client.log_param(run.info.run_id, key, value)
        return run.info.run_id

    def child_tags(self, spec: SweepSpec, parent_id: str, number: int) -> dict[str, str]:
        return {
            "mlflow.parentRunId": parent_id,
            "sweep.study": spec.study_name,
            "sweep.trial": str(number),
        }

    def trial_ended(
        self, run_id: str, outcome: str, reason: str, metrics: Mapping[str, float]
    ) -> None:
        self.client.set_tag(run_id, "sweep.outcome", outcome)
        if reason:
            self.client.set_tag(run_id, "sweep.reason", reason[:MAX_TAG])
        for key, value in metrics.items():
            self.client.log_metric(run_id, key, value)

    def mark_lost(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """A trial whose worker died: its child run (if it got one) ends FAILED, not RUNNING."""
        run_id = trial.user_attrs.get("mlflow_run_id")
        print(f"sweep: trial {trial.number} lost its worker; marked failed, will be redone")
        if run_id is None:
            return
        run = self.client.get_run(run_id)
        if run.info.status == "RUNNING":
            self.client.set_terminated(run_id, status="FAILED")
        self.client.set_tag(run_id, "sweep.outcome", "killed")
        self.client.set_tag(run_id, "sweep.reason", "worker process died mid-trial")

    def interrupted(self, parent_id: str) -> None:
        self.client.set_terminated(parent_id, status="KILLED")

    def finalize(self, study: optuna.Study, spec: SweepSpec, parent_id: str) -> list[int]:
        """Tag the best trial(s), log study artifacts and end the parent run FINISHED."""
        best = _best_trials(study)
        for trial in study.get_trials(deepcopy=False):
            run_id = trial.user_attrs.get("mlflow_run_id")
            if run_id is not None:
                self.client.set_tag(run_id, "best_trial", str(trial.number in best).lower())
        if best:
            self.client.set_tag(parent_id, "best_trial", ",".join(map(str, sorted(best))))
        if len(spec.objectives) == 1 and best:
            self.client.log_metric(
                parent_id, f"best/{spec.objectives[0].metric}", study.best_trial.value
            )
        with tempfile.TemporaryDirectory() as tmp:
            write_study_artifacts(study, spec, Path(tmp))
            self.client.log_artifacts(parent_id, tmp, artifact_path="study")
        self.client.set_terminated(parent_id, status="FINISHED")
        return sorted(best)


def _best_trials(study: optuna.Study) -> set[int]:
    """Single objective: the best COMPLETE trial; several: the Pareto front."""
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return set()
    if len(study.directions) == 1:
        return {study.best_trial.number}
    return {t.number for t in study.best_trials}
