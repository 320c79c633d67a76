"""End to end: train on the retrieval mix with train.eval_needle, then `nsa-lab eval needle`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from nsa_lab.cli import main
from nsa_lab.evaluation import needle as needle_eval
from tests.test_train_e2e import only_run, smoke_args

pytestmark = pytest.mark.slow

NEEDLE_FILES = {"needle_results.json", "needle_results.csv", "needle_heatmap.png"}


def needle_args(workdir: Path, *extra: str) -> list[str]:
    """The smoke budget at 128 tokens (room for a needle), half the windows retrieval samples."""
    return smoke_args(
        workdir,
        "tracking.run_name=needle",
        "model.max_seq_len=128",
        "data.seq_len=128",
        "data.needle_fraction=0.5",
        "train.eval_needle=true",
        *extra,
    )


def needle_artifacts(client: MlflowClient, run_id: str) -> set[str]:
    return {Path(a.path).name for a in client.list_artifacts(run_id, "needle")}


def test_train_evaluates_needles_then_the_cli_reevaluates_the_run(workdir: Path, capsys):
    assert main(["train", *needle_args(workdir)]) == 0
    assert "needle retrieval:" in capsys.readouterr().out
    client, run = only_run(workdir)
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    assert 0.0 <= metrics["needle/acc"] <= 1.0
    assert metrics["needle/acc_len_128"] == metrics["needle/acc"]  # one default length
    depth_cells = [k for k in metrics if k.startswith("needle/acc_128_")]
    assert len(depth_cells) == 11 and "needle/acc_128_50" in depth_cells
    assert client.get_metric_history(run_id, "needle/acc")[0].step == 30
    assert needle_artifacts(client, run_id) == NEEDLE_FILES
    table = json.loads(
        Path(
            client.download_artifacts(run_id, "needle/needle_results.json", str(workdir))
        ).read_text()
    )
    assert table["variant"] == "nsa" and table["trials"] == 20 and len(table["cells"]) == 11

    # By run id, on another grid: printed, written to --out, logged into the same run.
    out = workdir / "out"
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    grid = ["--lengths", "100,128", "--depths", "0,1", "--trials", "3", "--device", "cpu"]
    assert main(["eval", "needle", run_id, *grid, "--tracking-uri", uri, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| depth \\ length | 100 | 128 |" in printed and "| 100% |" in printed
    assert {p.name for p in out.iterdir()} == NEEDLE_FILES
    metrics = client.get_run(run_id).data.metrics
    assert {"needle/acc_len_100", "needle/acc_100_0", "needle/acc_128_100"} <= set(metrics)
    assert len(client.get_metric_history(run_id, "needle/acc")) == 2

    # Without the checkpoint tag (runs from before it existed) the params find the checkpoint.
    client.delete_tag(run_id, "checkpoint")
    assert main(["eval", "needle", run_id, *grid, "--tracking-uri", uri]) == 0
    # A checkpoint path logs into the run it names, in the store its config names.
    checkpoint = workdir / "ckpt" / "needle" / "last.ckpt"
    assert main(["eval", "needle", str(checkpoint), *grid]) == 0
    assert len(client.get_metric_history(run_id, "needle/acc")) == 4


def test_bad_eval_input_exits_2_before_any_work(workdir: Path, capsys, monkeypatch):
    assert (
        main(["train", *needle_args(workdir, "train.max_steps=2", "train.eval_needle=false")]) == 0
    )
    client, run = only_run(workdir)
    uri = ["--tracking-uri", f"sqlite:///{workdir / 'mlflow.db'}"]
    monkeypatch.setattr(needle_eval, "evaluate_model", lambda *a: pytest.fail("work started"))
    cases = [
        (["nope.ckpt"], "neither a checkpoint file nor an MLflow run id"),
        (["0" * 32, *uri], "no such run"),
        ([run.info.run_id, *uri, "--lengths", "256"], "--lengths=256"),
        ([run.info.run_id, *uri, "--depths", "0,2"], "--depths"),
        ([run.info.run_id, *uri, "--device", "tpu"], "--device='tpu'"),
    ]
    for args, message in cases:
        capsys.readouterr()
        assert main(["eval", "needle", *args]) == 2
        assert message in capsys.readouterr().err
    assert needle_artifacts(client, run.info.run_id) == set()


def test_a_failing_needle_eval_marks_the_run_failed(workdir: Path, monkeypatch):
    def broken(*args):
        raise RuntimeError("eval broke")

    monkeypatch.setattr(needle_eval, "evaluate_model", broken)
    with pytest.raises(RuntimeError, match="eval broke"):
        main(["train", *needle_args(workdir, "train.max_steps=2")])
    client, run = only_run(workdir)
    assert run.info.status == "FAILED"
    assert needle_artifacts(client, run.info.run_id) == set()


def test_curriculum_trains_short_rows_first_and_logs_the_answer_loss(workdir: Path):
    corpus = workdir / "corpus.txt"  # 23 windows of 256: two steps of 8 per epoch
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 134)
    args = smoke_args(
        workdir,
        "data.source=text",
        f"data.path={corpus}",
        "model.max_seq_len=256",
        "data.seq_len=256",
        "data.needle_fraction=1.0",
        "data.curriculum_seq_len=128",
        "data.curriculum_steps=3",  # steps 1-3 short, across an epoch's end
        "train.max_steps=8",
        "train.log_every=2",
    )
    assert main(["train", *args]) == 0
    client, run = only_run(workdir)
    run_id = run.info.run_id
    seq_lens = [m.value for m in client.get_metric_history(run_id, "train/seq_len")]
    assert seq_lens == [128.0, 256.0, 256.0, 256.0]  # logged after steps 2, 4, 6 and 8
    answer_losses = client.get_metric_history(run_id, "train/answer_loss")
    assert len(answer_losses) == 4 and all(m.value > 0 for m in answer_losses)
    assert all(0 <= m.value <= 1 for m in client.get_metric_history(run_id, "train/answer_acc"))
