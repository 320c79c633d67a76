"""``nsa-lab sweep``: plan, open (or resume) the study, run the workers, wrap up.

With ``workers: 1`` trials run in this process. With K > 1, or with ``--gpus``, this
process coordinates K spawned worker processes that share the study through its RDB
storage; each runs ``study.optimize`` one trial at a time until the budget is met (see
:mod:`nsa_lab.sweeps.study`). With ``--gpus`` each worker starts pinned to one GPU
(:mod:`nsa_lab.sweeps.gpus`). Signals:
Ctrl-C reaches every process of the terminal's group; SIGTERM (``timeout``, a batch
system) is forwarded to the workers; a worker whose coordinator vanished (SIGKILL)
stops on its own. Every interrupted trial is marked failed and redone on the next run;
finished trials are never repeated.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial

from nsa_lab.config import ConfigError
from nsa_lab.sweeps.plan import SweepPlan, plan_sweep
from nsa_lab.sweeps.spec import SweepSpec
from nsa_lab.sweeps.study import (
    default_storage,
    enqueue_grid,
    fail_dead_trials,
    lost_trial_handler,
    make_storage,
    next_step,
    open_study,
    tally,
)
from nsa_lab.sweeps.tracking import SweepTracker
from nsa_lab.sweeps.trial import TrialFailed, run_trial

MAX_REJECTED_IN_A_ROW = 200  # a sampler stuck in invalid regions stops the worker
WORKER_GRACE_S = 60  # how long interrupted workers get to mark their trials failed
POLL_S = 2.0  # how often a worker with nothing to run looks for dead trials to redo
EXIT_CONFIG = 2


@dataclass(frozen=True)
class SweepResult:
    study_name: str
    storage: str
    parent_run_id: str
    counts: dict[str, int]
    best_trials: list[int]
    failed_workers: list[int]


def run_sweep(spec: SweepSpec) -> SweepResult:
    """Run (or resume) the sweep to its budget; ConfigError before anything exists."""
    # Our own line per trial says its outcome; Optuna's warnings would repeat failures.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    plan = plan_sweep(spec)
    storage_url = spec.storage or default_storage(plan.tracking_uri)
    tracker = SweepTracker(plan.tracking_uri, spec.experiment)
    study = open_study(spec, make_storage(storage_url), create=True)
    enqueue_grid(study, plan)
    parent_id = tracker.parent_run(study, plan)
    _announce(plan, storage_url, study)
    try:
        failed = _run_workers(plan, storage_url, parent_id)
    except KeyboardInterrupt:
        tracker.interrupted(parent_id)
        raise
    best = tracker.finalize(study, spec, parent_id)
    return SweepResult(
        spec.study_name, storage_url, parent_id, tally(study.get_trials()), best, failed
    )


def _announce(plan: SweepPlan, storage_url: str, study: optuna.Study) -> None:
    spec, counts = plan.spec, tally(study.get_trials())
    on_gpus = f" on GPUs {','.join(spec.gpus)}" if spec.gpus else ""
    print(
        f"sweep {spec.study_name}: {counts['counted']}/{plan.n_trials} trials done, "
        f"{spec.workers} worker(s){on_gpus}, storage {storage_url}, "
        f"MLflow experiment {spec.experiment}",
        flush=True,
    )
    for point, why in plan.skipped:
        print(f"sweep: grid point {point} skipped: {why}", flush=True)


def work(plan: SweepPlan, storage_url: str, worker: int, parent_id: str) -> None:
    """Run trials until the study's budget is met, waiting while a running trial (maybe
    of a dead worker, then redone here once Optuna's heartbeat says so) could still fail."""
    tracker = SweepTracker(plan.tracking_uri, plan.spec.experiment)
    storage = make_storage(storage_url, on_stale=lost_trial_handler(tracker.mark_lost))
    study = open_study(plan.spec, storage, worker)
    objective = functools.partial(
        run_trial, study=study, plan=plan, tracker=tracker, parent_id=parent_id
    )
    rejected = 0
    while (step := next_step(study.get_trials(deepcopy=False), plan)) != "done":
        if step == "wait":
            time.sleep(POLL_S)
            fail_dead_trials(study)
            continue
        ended: list[FrozenTrial] = []  # the trial just run, as Optuna's callback sees it
        keep = [lambda _, trial, ended=ended: ended.append(trial)]
        study.optimize(objective, n_trials=1, catch=(TrialFailed,), callbacks=keep)
        rejected = rejected + 1 if ended[0].user_attrs.get("outcome") == "rejected" else 0
        if rejected >= MAX_REJECTED_IN_A_ROW:
            raise ConfigError(
                "constraints",
                plan.spec.name,
                f"the sampler proposed {rejected} invalid trial configs in a row; "
                "narrow the space to values that satisfy the rules",
            )


def _run_workers(plan: SweepPlan, storage_url: str, parent_id: str) -> list[int]:
    """Run the workers; returns the indices of those that exited with an error."""
    spec = plan.spec
    if spec.workers == 1 and not spec.gpus:
        with SigtermAsInterrupt():
            work(plan, storage_url, 0, parent_id)
        return []
    worker_args = [(plan, storage_url, i, parent_id, os.getpid()) for i in range(spec.workers)]
    with SigtermAsInterrupt() as got_sigterm:
        procs = start_workers(
            _worker_main, worker_args, [spec.gpu_of(i) for i in range(spec.workers)]
        )
        try:
            for p in procs:
                p.join()
        except KeyboardInterrupt:
            _stop_workers(procs, forward=got_sigterm.is_set())
            raise
    return [i for i, p in enumerate(procs) if p.exitcode != 0]


def start_workers(
    target: Callable[..., None], worker_args: Sequence[tuple], gpus: Sequence[str | None]
) -> list[mp.Process]:
    """Start worker ``i`` as ``target(*worker_args[i])`` in a fresh (spawned) interpreter,
    with no forked torch/CUDA/DB state, and ``CUDA_VISIBLE_DEVICES=gpus[i]`` in its
    environment from the start (None: this process's own)."""
    ctx = mp.get_context("spawn")
    procs = []
    for i, (args, gpu) in enumerate(zip(worker_args, gpus, strict=True)):
        proc = ctx.Process(target=target, args=args, name=f"sweep-worker-{i}")
        with _environment("CUDA_VISIBLE_DEVICES", gpu):
            proc.start()
        procs.append(proc)
    return procs


@contextlib.contextmanager
def _environment(name: str, value: str | None) -> Iterator[None]:
    """``os.environ[name] = value`` inside the block (a spawned child inherits it), then
    as before; None leaves the variable alone."""
    before = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def _stop_workers(procs: list[mp.Process], forward: bool) -> None:
    """SIGTERM reached only us, so pass it on; Ctrl-C already reached everyone."""
    if forward:
        for p in procs:
            if p.is_alive():
                p.terminate()
    deadline = time.monotonic() + WORKER_GRACE_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


class SigtermAsInterrupt:
    """Turn the first SIGTERM into KeyboardInterrupt (so Lightning and the trial shut down
    as on Ctrl-C); later ones are ignored while cleaning up. Yields an Event set on SIGTERM."""

    def __enter__(self) -> threading.Event:
        self.event = threading.Event()
        self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self.event

    def _handle(self, signum: int, frame: object) -> None:
        if self.event.is_set():
            return
        self.event.set()
        raise KeyboardInterrupt

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGTERM, self.previous)


def _worker_main(
    plan: SweepPlan, storage_url: str, worker: int, parent_id: str, coordinator: int
) -> None:
    """Entry point of a spawned worker process."""
    _exit_with(coordinator)
    _share_cpu_threads(plan.spec.workers)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with SigtermAsInterrupt():
            work(plan, storage_url, worker, parent_id)
    except ConfigError as exc:
        print(f"nsa-lab: error: {exc}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    except KeyboardInterrupt:
        sys.exit(130)


def _exit_with(coordinator: int) -> None:
    """If the coordinator dies (even by SIGKILL), interrupt this worker like SIGTERM would."""

    def watch() -> None:
        while os.getppid() == coordinator:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True, name="coordinator-watch").start()


def _share_cpu_threads(workers: int) -> None:
    """K workers on one machine split its cores instead of each taking all of them
    (oversubscribed CPU training slows down many times); OMP_NUM_THREADS still wins."""
    if "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
