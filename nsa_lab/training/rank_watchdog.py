"""The watchdog beside rank 0 of a multi-process training (see ``RankWatchdog``).

Rank 0 starts it with :func:`start` and ends it with :func:`stop`.

``python -m nsa_lab.training.rank_watchdog --parent PID --uri URI --run-id ID --ranks PID...``
waits, reading its stdin, until rank 0 (``--parent``) says ``done`` (training ended
under its control, and it marked the MLflow run itself: nothing to do) or vanishes
without a word (killed, by SIGKILL too). Then it SIGKILLs the other ranks of this
machine (``--ranks``), which would otherwise wait in a collective for a rank 0 that
never comes, and marks the MLflow run FAILED.

It imports MLflow only once it has a run to mark, and nothing else heavy, so that a
watchdog costs one idle process; this module imports nothing beyond the standard
library.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

POLL_S = 0.2
# How long rank 0 waits, at the end of training, for its watchdog to exit.
STOP_WAIT_S = 10


def start(tracking_uri: str, run_id: str, ranks: Sequence[int]) -> subprocess.Popen:
    """Starts the watchdog of this process (rank 0) over the other local ``ranks``.

    It runs in its own session, so that Ctrl-C (which rank 0 handles) does not reach it.
    """
    command = [
        sys.executable,
        "-m",
        "nsa_lab.training.rank_watchdog",
        "--parent",
        str(os.getpid()),
        "--uri",
        tracking_uri,
        "--run-id",
        run_id,
        *(["--ranks", *map(str, ranks)] if ranks else []),
    ]
    return subprocess.Popen(command, stdin=subprocess.PIPE, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    """Tells the watchdog that rank 0 is done (the run is marked), and waits for it."""
    with contextlib.suppress(OSError):  # a watchdog that is gone has nothing left to do
        assert proc.stdin is not None
        proc.stdin.write(b"done\n")
        proc.stdin.close()
    try:
        proc.wait(timeout=STOP_WAIT_S)
    except subprocess.TimeoutExpired:
        proc.kill()


def wait_for_parent(parent: int, poll_s: float = POLL_S) -> bool:
    """True once the parent says it is done; False when it is gone without a word."""
    while True:
        ready, _, _ = select.select([sys.stdin], [], [], poll_s)
        if ready:
            return sys.stdin.readline().strip() == "done"  # "" at EOF: the pipe closed
        if os.getppid() != parent:  # reparented: the parent died
            return False


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, dead but not reaped, does not); Linux."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def kill_ranks(pids: Sequence[int]) -> list[int]:
    """SIGKILL the processes still alive among ``pids``; returns those it signalled."""
    killed = []
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    return killed


def mark_failed(uri: str, run_id: str) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=uri).set_terminated(run_id, status="FAILED")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--uri", required=True)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--ranks", type=int, nargs="*", default=[])
    args = parser.parse_args(argv)
    if wait_for_parent(args.parent):
        return 0
    began = time.monotonic()
    killed = kill_ranks(args.ranks)
    mark_failed(args.uri, args.run_id)
    print(
        f"rank watchdog: rank 0 (pid {args.parent}) vanished; SIGKILL sent to ranks "
        f"{killed}, MLflow run {args.run_id} marked FAILED "
        f"({time.monotonic() - began:.1f} s)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
