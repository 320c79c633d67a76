"""The Optuna study behind a sweep: storage, resume, the trial budget, grid points.

Bookkeeping lives in the study itself, so any process (a local worker, another machine
on the same PostgreSQL URL) sees the same state:

- every trial gets a user attr ``outcome`` when it ends: ``complete``, ``pruned``
  (by the pruner), ``crashed``, ``nan``, ``no_metric`` (these count toward the budget),
  ``rejected`` (its config broke a constraint, never trained), ``surplus`` (claimed
  after the budget or its grid point was taken, never trained) or ``interrupted``
  (Ctrl-C/SIGTERM). A FAIL trial
  without an outcome was killed: its worker died. Only counted trials use the budget.
- ``--trials N`` is the total the study should hold, not "N more": re-running the same
  command after a kill resumes where it stopped and never repeats a finished trial.
- A grid is enqueued up front (Optuna's WAITING queue hands each point to one worker);
  points whose trial was interrupted are enqueued again on the next run. Two commands
  started on one study at the same instant may both enqueue a missing point: the later
  claim of it ends ``surplus`` (:func:`claim_conflict`), so no point trains twice.
- Dead workers: Optuna's heartbeat (recorded by ``study.optimize`` in ``RDBStorage``)
  fails a trial whose worker went silent for ``GRACE_S``; :func:`lost_trial_handler`
  ends its MLflow run and ``RetryHeartbeatStaleTrialCallback`` queues its parameters
  again, for a worker still running to redo.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import optuna
import sqlalchemy.exc
from optuna.exceptions import ExperimentalWarning
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from nsa_lab.config import SQLITE_PREFIX, ConfigError, sqlite_path
from nsa_lab.sweeps.plan import SweepPlan
from nsa_lab.sweeps.space import Scalar
from nsa_lab.sweeps.spec import SweepSpec

COUNTED = ("complete", "pruned", "crashed", "nan", "no_metric")
NEVER_TRAINED = ("rejected", "surplus")
HEARTBEAT_S = 5  # how often Optuna records that a running trial is alive
GRACE_S = 30  # silence after which a trial counts as dead (and is retried)
SQLITE_TIMEOUT_S = 60  # wait this long for a busy SQLite file (several local workers)
STORAGE_OPEN_ATTEMPTS = 5  # opening a new database races with other processes creating it
FINGERPRINT_ATTR = "spec_fingerprint"
PARENT_RUN_ATTR = "mlflow_parent_run_id"
GRID_ATTR = "grid_point"

StaleCallback = Callable[[optuna.Study, FrozenTrial], None]


def default_storage(tracking_uri: str) -> str:
    """``optuna.db`` beside a SQLite MLflow store; in the current directory otherwise."""
    db = sqlite_path(tracking_uri)
    folder = Path.cwd() if db is None else db.resolve().parent
    return f"{SQLITE_PREFIX}{folder / 'optuna.db'}"


def make_storage(url: str, on_stale: StaleCallback | None = None) -> RDBStorage:
    """The study's storage with heartbeats, created (schema included) if it is new.

    Processes that open a new database at the same moment race to write its schema
    version; the loser gets an integrity error although the schema is then complete, so
    it simply opens the database again.
    """
    for attempt in range(1, STORAGE_OPEN_ATTEMPTS):
        try:
            return _rdb_storage(url, on_stale)
        except sqlalchemy.exc.IntegrityError:
            time.sleep(0.2 * attempt)
    return _rdb_storage(url, on_stale)


def _rdb_storage(url: str, on_stale: StaleCallback | None) -> RDBStorage:
    sqlite = url.startswith("sqlite")
    with warnings.catch_warnings():  # heartbeats are "experimental" since Optuna 2.9
        warnings.simplefilter("ignore", ExperimentalWarning)
        return RDBStorage(
            url,
            engine_kwargs={"connect_args": {"timeout": SQLITE_TIMEOUT_S}}
            if sqlite
            else {"pool_pre_ping": True},
            heartbeat_interval=HEARTBEAT_S,
            grace_period=GRACE_S,
            heartbeat_stale_trial_callback=on_stale,
        )


def lost_trial_handler(on_lost: StaleCallback) -> StaleCallback:
    """Called once per trial Optuna found dead: ``on_lost`` (its MLflow run), then a retry
    with the same parameters (a grid point is thereby never dropped)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback()

    def handle(study: optuna.Study, trial: FrozenTrial) -> None:
        on_lost(study, trial)
        retry(study, trial)

    return handle


def fail_dead_trials(study: optuna.Study) -> None:
    """Optuna's stale-trial check (``optimize`` runs it before each trial too)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def open_study(
    spec: SweepSpec, storage: RDBStorage, worker: int = 0, create: bool = False
) -> optuna.Study:
    """Create or load the study; refuse to resume one started from a different spec."""
    kwargs = {
        "study_name": spec.study_name,
        "storage": storage,
        "sampler": spec.make_sampler(worker),
        "pruner": spec.make_pruner(),
    }
    if not create:
        return optuna.load_study(**kwargs)
    study = optuna.create_study(**kwargs, directions=spec.directions, load_if_exists=True)
    stored = study.user_attrs.get(FINGERPRINT_ATTR)
    if stored is None:
        study.set_user_attr(FINGERPRINT_ATTR, spec.fingerprint())
    elif stored != spec.fingerprint():
        raise ConfigError(
            "sweep spec",
            str(spec.source),
            f"differs from the one study {spec.study_name!r} was started with (base files, "
            "fixed, space, constraints, objectives or sampler changed); give the spec a new "
            "name: to start another study",
        )
    if [d.name.lower() for d in study.directions] != spec.directions:
        raise ConfigError("objectives", spec.directions, "differ from the stored study's")
    return study


def counts_toward_budget(trial: FrozenTrial) -> bool:
    return trial.state.is_finished() and trial.user_attrs.get("outcome") in COUNTED


def tally(trials: Sequence[FrozenTrial]) -> dict[str, int]:
    """How many trials count, are running, wait to run, were never trained or died."""
    out = {"counted": 0, "running": 0, "waiting": 0, "rejected": 0, "lost": 0}
    for t in trials:
        if counts_toward_budget(t):
            out["counted"] += 1
        elif t.state in (TrialState.RUNNING, TrialState.WAITING):
            out[t.state.name.lower()] += 1
        elif t.user_attrs.get("outcome") in NEVER_TRAINED:
            out["rejected"] += 1
        else:
            out["lost"] += 1  # killed or interrupted: redone
    return out


def grid_key(point: dict[str, Scalar]) -> str:
    return json.dumps(point, sort_keys=True)


def enqueue_grid(study: optuna.Study, plan: SweepPlan) -> None:
    """Queue the grid points the budget still needs, in spec order: those without a
    counted, running or waiting trial (a first run queues them all)."""
    holding = [t for t in study.get_trials(deepcopy=False) if _holds_point(t)]
    taken = {t.user_attrs.get(GRID_ATTR) for t in holding}
    missing = [p for p in plan.grid_points or () if grid_key(p) not in taken]
    for point in missing[: max(0, plan.n_trials - len(holding))]:
        study.enqueue_trial(point, user_attrs={GRID_ATTR: grid_key(point)})


def _holds_point(trial: FrozenTrial) -> bool:
    return counts_toward_budget(trial) or trial.state in (TrialState.RUNNING, TrialState.WAITING)


def next_step(trials: Sequence[FrozenTrial], plan: SweepPlan) -> str:
    """``run`` another trial, ``wait`` (a running one may die and need redoing) or ``done``.

    A grid runs only queued points; other samplers also draw new ones.
    """
    counts = tally(trials)
    if counts["counted"] >= plan.n_trials:
        return "done"
    room = counts["counted"] + counts["running"] < plan.n_trials
    if room and (counts["waiting"] or plan.grid_points is None):
        return "run"
    return "wait" if counts["running"] else "done"


def claim_conflict(trials: Sequence[FrozenTrial], number: int, plan: SweepPlan) -> str | None:
    """Why trial ``number``, just claimed, must give way; None if it may run.

    Workers check the budget and claim without a lock, so two may claim its last place,
    or two copies of one grid point (queued by two commands started at once); the later
    claim (by start time, then number: the same order in every process) gives way.
    """
    mine = next(t for t in trials if t.number == number)
    point = mine.user_attrs.get(GRID_ATTR)
    if plan.grid_points is not None and point is None:
        return "drawn by the sampler once the grid queue was empty"
    earlier = [t for t in trials if t.state == TrialState.RUNNING and _claim(t) < _claim(mine)]
    held = [t for t in trials if counts_toward_budget(t)] + earlier
    if len(held) >= plan.n_trials:
        return "claimed once the budget was full"
    if point is not None and any(t.user_attrs.get(GRID_ATTR) == point for t in held):
        return "its grid point was claimed by another trial first"
    return None


def _claim(trial: FrozenTrial) -> tuple:
    """When a trial was claimed: Optuna stamps ``datetime_start`` on leaving the queue."""
    return (trial.datetime_start, trial.number)
