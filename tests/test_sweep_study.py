"""The study's budget without a lock: every process agrees which claim gives way, and a
grid is queued once, only for the points the budget still needs."""

from __future__ import annotations

import json

import optuna
from optuna.trial import TrialState

from nsa_lab.sweeps.plan import plan_sweep
from nsa_lab.sweeps.spec import load_spec
from nsa_lab.sweeps.study import claim_conflict, enqueue_grid, next_step, tally
from tests.test_sweep_spec import write_spec


def grid_plan(tmp_path, trials: int | None = None):
    fields = {"space": {"train.seed": [0, 1, 2]}} | ({"trials": trials} if trials else {})
    return plan_sweep(load_spec(write_spec(tmp_path, **fields)))


def test_grid_is_queued_once_and_refilled_only_where_a_point_was_lost(tmp_path):
    plan, study = grid_plan(tmp_path), optuna.create_study()
    enqueue_grid(study, plan)
    enqueue_grid(study, plan)  # a re-run queues nothing twice
    assert [t.user_attrs["grid_point"] for t in study.trials] == [
        f'{{"train.seed": {s}}}' for s in (0, 1, 2)
    ]
    first = study.ask()
    first.set_user_attr("outcome", "interrupted")
    study.tell(first, state=TrialState.FAIL)  # an interrupted point is queued again
    enqueue_grid(study, plan)
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert sorted(json.loads(t.user_attrs["grid_point"])["train.seed"] for t in waiting) == [
        0,
        1,
        2,
    ]


def test_budget_counts_running_claims_and_the_later_claim_gives_way(tmp_path):
    plan, study = grid_plan(tmp_path, trials=2), optuna.create_study()
    enqueue_grid(study, plan)
    assert next_step(study.trials, plan) == "run"
    a, b = study.ask(), study.ask()
    assert next_step(study.trials, plan) == "wait"  # both places taken, none counted yet
    assert claim_conflict(study.trials, a.number, plan) is None
    assert claim_conflict(study.trials, b.number, plan) is None
    study.enqueue_trial({"train.seed": 2}, user_attrs={"grid_point": "again"})
    c = study.ask()  # a third claim, racing the first two
    assert claim_conflict(study.trials, c.number, plan) == "claimed once the budget was full"
    for trial in (a, b):
        trial.set_user_attr("outcome", "complete")
        study.tell(trial, 1.0)
    c.set_user_attr("outcome", "surplus")
    study.tell(c, state=TrialState.FAIL)
    assert next_step(study.trials, plan) == "done"
    assert tally(study.trials) == {
        "counted": 2,
        "running": 0,
        "waiting": 0,
        "rejected": 1,
        "lost": 0,
    }


def test_a_grid_point_queued_twice_trains_once(tmp_path):
    """Two commands started at once may both queue a point; its later claim gives way."""
    plan, study = grid_plan(tmp_path), optuna.create_study()
    enqueue_grid(study, plan)
    study.enqueue_trial({"train.seed": 0}, user_attrs={"grid_point": '{"train.seed": 0}'})
    first, *others = [study.ask() for _ in range(3)]
    for trial in others:  # interrupted: they hold neither a place nor a point
        study.tell(trial, state=TrialState.FAIL)
    copy = study.ask()
    assert claim_conflict(study.trials, first.number, plan) is None
    assert "grid point was claimed by another trial first" in claim_conflict(
        study.trials, copy.number, plan
    )
    study.enqueue_trial({"train.seed": 1})  # no grid point: drawn past the grid's queue
    assert "grid queue was empty" in claim_conflict(study.trials, study.ask().number, plan)
