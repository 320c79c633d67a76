"""Trainings started together on a new SQLite MLflow store (one per GPU) all get it."""

from __future__ import annotations

import multiprocessing as mp

from mlflow.tracking import MlflowClient

from nsa_lab.config import sqlite_path
from nsa_lab.tracking.mlflow_run import artifact_location, open_store


def _open(uri: str, barrier) -> None:
    barrier.wait()  # all processes create the store at the same moment
    open_store(uri, "together")


def test_processes_opening_a_new_store_at_once_all_succeed_with_one_experiment(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(3)
    workers = [ctx.Process(target=_open, args=(uri, barrier)) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert [w.exitcode for w in workers] == [0, 0, 0]
    experiments = [e.name for e in MlflowClient(uri).search_experiments()]
    assert experiments.count("together") == 1


def test_sqlite_path_reads_the_file_of_a_sqlite_uri_only(tmp_path):
    assert sqlite_path(f"sqlite:///{tmp_path}/m.db") == tmp_path / "m.db"
    assert sqlite_path("http://127.0.0.1:5000") is None
    assert artifact_location("http://host") is None
    assert artifact_location(f"sqlite:///{tmp_path}/m.db") == (tmp_path / "mlartifacts").as_uri()
