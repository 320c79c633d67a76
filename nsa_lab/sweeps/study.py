"""The Optuna study behind a sweep: storage, resume, the trial budget, claiming trials.

Bookkeeping lives in the study itself, so any process (a local worker, another machine
on the same PostgreSQL URL) sees the same state:

- every trial gets a user attr ``outcome`` when it ends: ``complete``, ``pruned``
  (by the pruner), ``crashed``, ``nan``, ``no_metric`` (these count toward the budget),
  ``rejected`` (its config broke a constraint, never trained) or ``interrupted``
  (Ctrl-C/SIGTERM). A FAIL trial without an outcome was killed: its worker died.
  Rejected, interrupted and killed trials do not count, so re-running redoes them.
- ``--trials N`` is the total the study should hold, not "N more": re-running the same
  command after a kill resumes where it stopped and never repeats a finished trial.
- Claiming (budget check + ``ask``) happens under a file lock, so local workers never
  overshoot; machines sharing a database can overshoot by at most one trial each at
  the very end, as with Optuna's own distributed mode.
- Dead workers: a trial RUNNING on this host whose worker process is gone is failed at
  once; trials of other hosts are failed by Optuna's heartbeat once stale.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import optuna
import sqlalchemy.exc
from optuna.storages import RDBStorage, fail_stale_trials
from optuna.trial import FrozenTrial, TrialState

from nsa_lab.config import SQLITE_PREFIX, ConfigError, sqlite_path
from nsa_lab.sweeps.plan import SweepPlan
from nsa_lab.sweeps.space import Scalar
from nsa_lab.sweeps.spec import SweepSpec

COUNTED = ("complete", "pruned", "crashed", "nan", "no_metric")
HEARTBEAT_S = 10  # how often a running trial says it is alive
GRACE_S = 60  # silence after which another machine's trial counts as dead
SQLITE_TIMEOUT_S = 60  # wait this long for a busy SQLite file (several local workers)
STORAGE_OPEN_ATTEMPTS = 5  # opening a new database races with other processes creating it
FINGERPRINT_ATTR = "spec_fingerprint"
PARENT_RUN_ATTR = "mlflow_parent_run_id"

StaleCallback = Callable[[optuna.Study, FrozenTrial], None]


def default_storage(tracking_uri: str) -> str:
    """``optuna.db`` beside a SQLite MLflow store; in the current directory otherwise."""
    db = sqlite_path(tracking_uri)
    folder = Path.cwd() if db is None else db.resolve().parent
    return f"{SQLITE_PREFIX}{folder / 'optuna.db'}"


def make_storage(url: str, on_stale: StaleCallback | None = None) -> RDBStorage:
    """The study's storage, created (schema included) if it does not exist yet.

    Processes that open a new database at the same moment (workers on several GPUs or
    machines started together, or a monitor polling the file) race to write its schema
    version; the loser gets an integrity error although the schema is then complete, so
    it simply opens the database again.
    """
    engine_kwargs = (
        {"connect_args": {"timeout": SQLITE_TIMEOUT_S}}
        if url.startswith("sqlite")
        else {"pool_pre_ping": True}
    )
    for attempt in range(1, STORAGE_OPEN_ATTEMPTS):
        try:
            return _rdb_storage(url, engine_kwargs, on_stale)
        except sqlalchemy.exc.IntegrityError:
            time.sleep(0.2 * attempt)
    return _rdb_storage(url, engine_kwargs, on_stale)


def _rdb_storage(url: str, engine_kwargs: dict, on_stale: StaleCallback | None) -> RDBStorage:
    with warnings.catch_warnings():  # heartbeats are "experimental" since Optuna 2.9
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=HEARTBEAT_S,
            grace_period=GRACE_S,
            heartbeat_stale_trial_callback=on_stale,
        )


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
    """How many trials count, are running, wait to run, were rejected or died."""
    out = {"counted": 0, "running": 0, "waiting": 0, "rejected": 0, "lost": 0}
    for t in trials:
        outcome = t.user_attrs.get("outcome")
        if counts_toward_budget(t):
            out["counted"] += 1
        elif t.state == TrialState.RUNNING:
            out["running"] += 1
        elif t.state == TrialState.WAITING:
            out["waiting"] += 1
        elif outcome == "rejected":
            out["rejected"] += 1
        else:
            out["lost"] += 1  # killed or interrupted: redone on resume
    return out


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def reap_dead_trials(study: optuna.Study, storage: RDBStorage, on_lost: StaleCallback) -> None:
    """Fail the RUNNING trials whose worker is gone: this host's at once (its process no
    longer exists), other hosts' through Optuna's heartbeat (which calls ``on_lost`` too)."""
    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = str(t.user_attrs.get("worker", ""))
        name, _, pid = owner.rpartition(":")
        if name == host and pid.isdigit() and not _process_alive(int(pid)):
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
                on_lost(study, t)
    with warnings.catch_warnings():  # "experimental" since Optuna 2.9, and still the API
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        fail_stale_trials(study)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(OSError):  # a zombie (dead, not yet reaped) is dead
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


@contextlib.contextmanager
def claim_lock(storage_url: str, study_name: str) -> Iterator[None]:
    """An exclusive lock shared by this machine's workers (released if a holder dies)."""
    db = sqlite_path(storage_url)
    if db is not None:
        path = Path(f"{db}.{study_name}.lock")
    else:
        digest = hashlib.sha256(f"{storage_url} {study_name}".encode()).hexdigest()[:16]
        path = Path(tempfile.gettempdir()) / f"nsa-lab-sweep-{digest}.lock"
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def claim_trial(
    study: optuna.Study,
    storage: RDBStorage,
    plan: SweepPlan,
    storage_url: str,
    on_lost: StaleCallback,
) -> optuna.Trial | None:
    """The next trial to run, or None once the budget (or the grid) is used up."""
    with claim_lock(storage_url, plan.spec.study_name):
        reap_dead_trials(study, storage, on_lost)
        trials = study.get_trials(deepcopy=False)
        counts = tally(trials)
        if counts["counted"] + counts["running"] >= plan.n_trials:
            return None
        if plan.grid_points is not None and counts["waiting"] == 0:
            point = next_grid_point(plan.grid_points, trials)
            if point is None:
                return None
            study.enqueue_trial(point, user_attrs={"grid_point": grid_key(point)})
        with warnings.catch_warnings():  # ask/tell with heartbeats: ours is `Heartbeat`
            warnings.filterwarnings("ignore", "Heartbeat of storage", UserWarning)
            trial = study.ask()
        trial.set_user_attr("worker", worker_id())
        storage.record_heartbeat(trial._trial_id)
        return trial


def grid_key(point: dict[str, Scalar]) -> str:
    return json.dumps(point, sort_keys=True)


def next_grid_point(
    points: Sequence[dict[str, Scalar]], trials: Sequence[FrozenTrial]
) -> dict[str, Scalar] | None:
    """The first valid grid point without a finished-and-counted, running or waiting trial."""
    taken = {
        t.user_attrs.get("grid_point")
        for t in trials
        if counts_toward_budget(t) or t.state in (TrialState.RUNNING, TrialState.WAITING)
    }
    return next((p for p in points if grid_key(p) not in taken), None)


class Heartbeat:
    """Records the trial's heartbeat in a thread while the trial trains."""

    def __init__(self, storage: RDBStorage, trial_id: int) -> None:
        self._storage, self._trial_id = storage, trial_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self._storage.record_heartbeat(self._trial_id)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
