"""Sweeps end to end on the CPU: workers, MLflow structure, constraints, NaN, kill + resume."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy.exc
import torch
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from nsa_lab.cli import main
from nsa_lab.config import ConfigError
from nsa_lab.sweeps import study as study_module
from nsa_lab.sweeps.plan import trial_config
from nsa_lab.sweeps.spec import load_spec
from nsa_lab.sweeps.study import make_storage, tally
from tests.test_sweep_spec import REPO, write_spec

SMOKE_SPEC = REPO / "sweeps" / "smoke.yaml"
TINY = {
    "train.max_steps": 4,
    "train.val_every": 2,
    "train.val_batches": 1,
    "train.log_every": 2,
    "train.warmup_steps": 1,
    "data.batch_size": 4,
}

pytestmark = pytest.mark.slow


@pytest.fixture
def one_thread(workdir, monkeypatch):
    """One torch thread per process: on a shared 2-core machine, oversubscribed CPU
    training is many times slower. Spawned workers read OMP_NUM_THREADS."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield workdir
    torch.set_num_threads(before)


def uri_in(folder: Path) -> str:
    return f"tracking.uri=sqlite:///{folder}/mlflow.db"


def study_of(folder: Path, spec_path: Path, *overrides: str) -> optuna.Study:
    name = load_spec(spec_path, overrides).study_name
    return optuna.load_study(study_name=name, storage=f"sqlite:///{folder}/optuna.db")


def mlflow_runs(folder: Path, experiment: str) -> tuple[list, list]:
    """(parent runs, child runs) of the experiment."""
    client = MlflowClient(f"sqlite:///{folder}/mlflow.db")
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep.kind") == "study"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def test_smoke_sweep_two_workers(one_thread, capsys):
    uri = uri_in(one_thread)
    assert main(["sweep", str(SMOKE_SPEC), uri, "--workers", "2"]) == 0
    study = study_of(one_thread, SMOKE_SPEC, uri)
    trials = study.get_trials()
    assert tally(trials)["counted"] == 4 and tally(trials)["running"] == 0
    trained = [t for t in trials if "mlflow_run_id" in t.user_attrs]
    assert len(trained) == 4
    assert len({t.user_attrs["worker"] for t in trained}) == 2  # both workers trained
    spec = load_spec(SMOKE_SPEC, [uri])
    for t in trials:  # constraint violations are never trained
        if t.user_attrs["outcome"] == "rejected":
            assert "mlflow_run_id" not in t.user_attrs and t.state == TrialState.PRUNED
            with pytest.raises(ConfigError):
                trial_config(spec, t.params)
        else:
            trial_config(spec, t.params)

    [parent], children = mlflow_runs(one_thread, "sweep-smoke")
    assert parent.info.status == "FINISHED"
    assert study.user_attrs["mlflow_parent_run_id"] == parent.info.run_id
    by_run = {t.user_attrs["mlflow_run_id"]: t for t in trained}
    assert {c.info.run_id for c in children} == set(by_run)
    for child in children:
        trial = by_run[child.info.run_id]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags["sweep.trial"] == str(trial.number)
        assert child.data.tags["sweep.outcome"] == trial.user_attrs["outcome"]
        assert {k: child.data.params[k] for k in trial.params} == {
            k: str(v) for k, v in trial.params.items()
        }
        assert child.data.params["model.n_layers"] == "2"  # the full config, not just the space
        assert "val/loss" in child.data.metrics
        assert child.data.metrics["cost/attended_tokens_per_query"] > 0
    best = [c for c in children if c.data.tags["best_trial"] == "true"]
    assert [by_run[c.info.run_id].number for c in best] == [study.best_trial.number]
    assert best[0].data.metrics["val/loss"] == pytest.approx(study.best_value)

    client = MlflowClient(uri.partition("=")[2])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "study")}
    for name in ("trials.csv", "optimization_history.png", "parallel_coordinate.png"):
        assert f"study/{name}" in artifacts
    csv = Path(client.download_artifacts(parent.info.run_id, "study/trials.csv"))
    assert len(csv.read_text().strip().splitlines()) == len(trials) + 1

    capsys.readouterr()
    assert main(["sweep", str(SMOKE_SPEC), uri]) == 0  # done already: resumes to nothing
    assert len(study_of(one_thread, SMOKE_SPEC, uri).get_trials()) == len(trials)
    assert "4/4 trials done" in capsys.readouterr().out


def test_random_sampler_rejects_invalid_configs_untrained(one_thread):
    path = write_spec(
        one_thread,
        name="rej",
        fixed=TINY,
        space={"attn.d": [3, 4], "attn.w": [16, 32]},
        sampler={"type": "random", "seed": 4},  # draws d=3 twice, then d=4 twice
        trials=2,
    )
    assert main(["sweep", str(path), uri_in(one_thread)]) == 0
    trials = study_of(one_thread, path, uri_in(one_thread)).get_trials()
    rejected = [t for t in trials if t.user_attrs["outcome"] == "rejected"]
    assert rejected and tally(trials)["counted"] == 2
    for t in rejected:
        assert t.params["attn.d"] == 3 and t.state == TrialState.PRUNED
        assert "attn.d=3: must divide attn.l=8" in t.user_attrs["reason"]
    _, children = mlflow_runs(one_thread, "rej")
    assert len(children) == 2 and {c.data.params["attn.d"] for c in children} == {"4"}


def test_nan_trial_fails_with_reason_and_sweep_goes_on(one_thread):
    path = write_spec(
        one_thread,
        name="nan",
        fixed={**TINY, "train.grad_clip": 0.0, "train.warmup_steps": 0},
        space={"train.lr": [10000.0, 0.003]},
    )
    assert main(["sweep", str(path), uri_in(one_thread)]) == 0
    diverged, fine = study_of(one_thread, path, uri_in(one_thread)).get_trials()
    assert diverged.params["train.lr"] == 10000.0 and diverged.state == TrialState.FAIL
    assert diverged.user_attrs["outcome"] == "nan"
    assert diverged.user_attrs["reason"] == "val/loss is nan at step 2"
    assert fine.state == TrialState.COMPLETE
    _, children = mlflow_runs(one_thread, "nan")
    tags = {c.data.params["train.lr"]: c.data.tags for c in children}
    assert tags["10000.0"]["sweep.outcome"] == "nan" and tags["0.003"]["best_trial"] == "true"


def test_crashed_trial_fails_with_reason_and_sweep_goes_on(one_thread):
    text = one_thread / "corpus.txt"
    text.write_text("Sparse attention reads a few blocks of keys per query. " * 400)
    missing = one_thread / "missing.txt"
    path = write_spec(
        one_thread,
        name="crash",
        fixed={**TINY, "data.source": "text"},
        space={"data.path": [str(missing), str(text)]},
    )
    assert main(["sweep", str(path), uri_in(one_thread)]) == 0
    crashed, fine = study_of(one_thread, path, uri_in(one_thread)).get_trials()
    assert crashed.state == TrialState.FAIL and crashed.user_attrs["outcome"] == "crashed"
    assert "missing.txt" in crashed.user_attrs["reason"]
    assert fine.state == TrialState.COMPLETE and fine.params["data.path"] == str(text)


def test_killed_sweep_resumes_without_repeating_finished_trials(one_thread, capsys):
    path = write_spec(
        one_thread,
        name="kill",
        fixed={**TINY, "train.max_steps": 60, "train.val_every": 10, "train.log_every": 10},
        space={"train.seed": [0, 1, 2]},
    )
    command = [sys.executable, "-m", "nsa_lab", "sweep", str(path), uri_in(one_thread)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log = open(one_thread / "first.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(command, cwd=one_thread, env=env, stdout=log, stderr=log)
    try:
        finished_before = _wait_until_mid_second_trial(one_thread, path, proc)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
        log.close()
    [killed] = study_of(one_thread, path, uri_in(one_thread)).get_trials(
        states=(TrialState.RUNNING,)
    )

    rerun = subprocess.run(command, cwd=one_thread, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    trials = study_of(one_thread, path, uri_in(one_thread)).get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(t.params["train.seed"] for t in complete) == [0, 1, 2]  # each point once
    still = {t.number: t.user_attrs["mlflow_run_id"] for t in complete}
    assert finished_before.items() <= still.items()  # finished trials kept, not redone
    lost = trials[killed.number]
    assert lost.state == TrialState.FAIL and "outcome" not in lost.user_attrs
    assert tally(trials) == {"counted": 3, "running": 0, "waiting": 0, "rejected": 0, "lost": 1}

    parents, children = mlflow_runs(one_thread, "kill")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    status = {c.info.run_id: c.info.status for c in children}
    assert status[killed.user_attrs["mlflow_run_id"]] == "FAILED"
    assert sorted(status.values()) == ["FAILED", "FINISHED", "FINISHED", "FINISHED"]
    assert main(["report", "kill", uri_in(one_thread)]) == 0  # the killed run is left out
    assert "3 runs (1 interrupted or unfinished runs left out)" in capsys.readouterr().out


def _wait_until_mid_second_trial(folder: Path, path: Path, proc: subprocess.Popen) -> dict:
    """Poll the study until one trial is complete and the next is training; returns the
    complete trials as {number: MLflow run id}."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert proc.poll() is None, (folder / "first.log").read_text()[-3000:]
        trials = []
        if (folder / "optuna.db").exists():
            # The study may not exist yet, or its database be mid-creation by the sweep.
            with contextlib.suppress(KeyError, sqlalchemy.exc.SQLAlchemyError):
                trials = study_of(folder, path, uri_in(folder)).get_trials()
        done = {
            t.number: t.user_attrs["mlflow_run_id"]
            for t in trials
            if t.state == TrialState.COMPLETE
        }
        training = [
            t for t in trials if t.state == TrialState.RUNNING and "mlflow_run_id" in t.user_attrs
        ]
        if done and training:
            time.sleep(0.5)
            return done
        time.sleep(0.2)
    raise AssertionError("the sweep never reached its second trial")


def test_storage_opens_after_losing_the_schema_race(tmp_path: Path, monkeypatch) -> None:
    """Two processes creating one new database: the loser's integrity error is retried."""
    real, calls = study_module._rdb_storage, []

    def lose_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            real(*args, **kwargs)  # the "other process" creates the schema...
            raise sqlalchemy.exc.IntegrityError("INSERT INTO alembic_version", {}, None)
        return real(*args, **kwargs)

    monkeypatch.setattr(study_module, "_rdb_storage", lose_once)
    storage = make_storage(f"sqlite:///{tmp_path}/optuna.db")
    assert len(calls) == 2 and storage.get_all_studies() == []
