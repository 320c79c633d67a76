"""End to end: `nsa-lab train` on the smoke experiment, MLflow contents, resume, crash."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
from mlflow.tracking import MlflowClient

from nsa_lab.cli import main
from nsa_lab.config import load_config
from nsa_lab.models.flops import training_flops_per_token
from nsa_lab.training import module as module_lib
from nsa_lab.training.module import LanguageModel
from nsa_lab.training.run import train
from tests.conftest import SMOKE

pytestmark = pytest.mark.slow


def smoke_args(workdir: Path, *extra: str) -> list[str]:
    return [
        str(SMOKE),
        f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}",
        f"train.ckpt_dir={workdir / 'ckpt'}",
        "tracking.run_name=smoke",
        *extra,
    ]


def only_run(workdir: Path):
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def test_smoke_train_logs_a_complete_mlflow_run(workdir: Path, capsys):
    assert main(["train", *smoke_args(workdir)]) == 0
    assert "val loss" in capsys.readouterr().out

    client, run = only_run(workdir)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["attn.name"] == "nsa"
    assert params["attn.l"] == "8"
    assert params["attn.branches"] == "cmp,slc,win"
    assert int(params["model.n_params"]) > 0
    assert run.data.tags["variant"] == "nsa"
    assert run.data.tags["git_commit"]

    train_loss = client.get_metric_history(run.info.run_id, "train/loss")
    assert len(train_loss) >= 5
    val_loss = client.get_metric_history(run.info.run_id, "val/loss")
    assert len(val_loss) == 3  # after steps 10, 20 and 30
    assert val_loss[-1].value < val_loss[0].value + 0.5  # trained, not diverged
    metrics = run.data.metrics
    assert metrics["train/tokens_per_s"] > 0
    assert {"gates/layer0/cmp", "gates/layer1/win", "val/ppl"} <= set(metrics)
    gate_steps = [m.step for m in client.get_metric_history(run.info.run_id, "gates/layer0/cmp")]
    assert gate_steps == [m.step for m in train_loss] and len(gate_steps) == 6  # none lost

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "loss_curve.png"} <= artifacts
    config_yaml = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(workdir)))
    assert load_config([config_yaml]).attn.l == 8
    assert (workdir / "ckpt" / "smoke" / "last.ckpt").is_file()
    assert not list((workdir / "ckpt").rglob("*.tmp"))


def test_resume_continues_the_same_run_from_its_step(workdir: Path):
    first = train(load_config([SMOKE], smoke_args(workdir, "train.max_steps=20")[1:]))
    assert first.global_step == 20
    second = train(
        load_config([SMOKE], smoke_args(workdir, "train.max_steps=30", "train.resume=true")[1:])
    )
    assert second.global_step == 30
    assert second.run_id == first.run_id

    client, run = only_run(workdir)
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert max(steps) >= 25
    assert steps == sorted(steps)  # the resumed run picked up where it stopped


class Boom(RuntimeError):
    pass


def test_a_crash_marks_the_run_failed_and_leaves_a_resumable_checkpoint(workdir, monkeypatch):
    real_step = module_lib.LanguageModel.training_step

    def failing_step(self, batch, batch_idx):
        if self.global_step == 12:
            raise Boom("injected failure")
        return real_step(self, batch, batch_idx)

    monkeypatch.setattr(module_lib.LanguageModel, "training_step", failing_step)
    with pytest.raises(Boom):
        train(load_config([SMOKE], smoke_args(workdir)[1:]))
    _, run = only_run(workdir)
    assert run.info.status == "FAILED"
    crash_ckpt = workdir / "ckpt" / "smoke" / "on_exception.ckpt"
    assert crash_ckpt.is_file()

    monkeypatch.setattr(module_lib.LanguageModel, "training_step", real_step)
    resumed = train(load_config([SMOKE], smoke_args(workdir, f"train.resume={crash_ckpt}")[1:]))
    assert resumed.global_step == 30
    _, run = only_run(workdir)
    assert run.info.status == "FINISHED"


def test_ctrl_c_marks_the_run_failed_and_leaves_a_checkpoint(workdir: Path):
    """SIGINT mid-training, as a user's Ctrl-C: the run ends FAILED with on_exception.ckpt."""
    args = smoke_args(workdir, "train.max_steps=100000", "train.log_every=1")
    log = workdir / "stderr.txt"
    # stderr to a file, not a pipe: nobody reads a pipe before the end, and a child
    # blocked on a full one would not reach the step the test waits for.
    with log.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nsa_lab", "train", *args],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            preexec_fn=_ctrl_c_as_in_a_shell,
        )
        try:
            _wait_for_logged_steps(workdir, proc, log)
            _press_ctrl_c_until_it_exits(proc)
        finally:
            proc.kill()
            proc.wait()
    tail = log.read_text(errors="replace")[-3000:]
    assert proc.returncode not in (0, -signal.SIGKILL), tail
    _, run = only_run(workdir)
    assert run.info.status == "FAILED", tail
    assert (workdir / "ckpt" / "smoke" / "on_exception.ckpt").is_file(), tail


def _press_ctrl_c_until_it_exits(proc: subprocess.Popen, timeout: float = 120) -> None:
    """SIGINT, again every 10 s while the process lives, as a user presses Ctrl-C again
    when nothing happens: Python drops a KeyboardInterrupt raised inside a finaliser
    (``__del__``, a weakref callback), so one signal can go unheard. Once Lightning
    has caught one it ignores the rest, so a repeat never cuts the shutdown short."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue
    raise AssertionError(f"still running {timeout:.0f} s after the first Ctrl-C")


def _ctrl_c_as_in_a_shell() -> None:
    """In the child before exec: SIGINT unblocked and at its default, as a terminal's shell
    starts a program. A background job of a non-interactive shell (CI, ``nohup ... &``)
    starts with SIGINT ignored, pytest inherits that, and so would the child."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_for_logged_steps(
    workdir: Path, proc: subprocess.Popen, log: Path, timeout: float = 120
) -> None:
    """Poll the store with plain read-only sqlite: an MlflowClient here would race the
    child's schema creation."""
    db = workdir / "mlflow.db"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        try:
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
                query = "SELECT count(*) FROM metrics WHERE key = 'train/loss'"
                if conn.execute(query).fetchone()[0] >= 3:
                    return
        except sqlite3.Error:  # not created yet
            pass
        time.sleep(0.5)
    raise AssertionError("training never logged a step: " + log.read_text(errors="replace")[-3000:])


class BatchCounter(L.Callback):
    def __init__(self) -> None:
        self.batches = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches += 1


def test_accumulated_run_steps_max_steps_times_and_logs_its_cost(workdir: Path):
    """accumulate=2: max_steps optimizer steps of two micro-batches each; the run logs its
    FLOPs per token, and on a CPU neither MFU nor GPU memory."""
    counter = BatchCounter()
    overrides = ["train.max_steps=3", "train.accumulate=2", "train.val_every=3"]
    result = train(
        load_config([SMOKE], smoke_args(workdir, *overrides, "train.log_every=1")[1:]),
        callbacks=[counter],
    )
    assert result.global_step == 3 and counter.batches == 6
    client, run = only_run(workdir)
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == [0, 1, 2]  # one value per optimizer step
    trained = LanguageModel.load_from_checkpoint(result.checkpoint)
    cfg = trained.cfg
    expected = training_flops_per_token(trained.model, cfg.attn, cfg.data.seq_len)
    assert float(run.data.params["model.flops_per_token"]) == pytest.approx(expected)
    assert run.data.metrics["train/tokens_per_s"] > 0
    assert not {"train/mfu", "train/peak_mem_gib"} & set(run.data.metrics)
