"""Every experiment and sweep the repository ships loads, validates and (sweeps) plans,
without training anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from nsa_lab.config import load_config
from nsa_lab.sweeps.plan import plan_sweep
from nsa_lab.sweeps.spec import load_spec

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((REPO / "experiments").glob("*.yaml"))
SWEEPS = sorted((REPO / "sweeps").glob("*.yaml"))


def test_the_repository_ships_experiments_and_sweeps():
    assert EXPERIMENTS and SWEEPS


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_each_experiment_loads_and_validates(path: Path):
    cfg = load_config([path])
    assert cfg.train.max_steps >= 1


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_each_sweep_loads_and_plans(path: Path, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # planning must not need (or write) anything here
    plan = plan_sweep(load_spec(path))
    assert plan.n_trials >= 1 or plan.grid_points
    assert not list(tmp_path.iterdir())
