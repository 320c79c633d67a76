"""``nsa-lab report``: table, per-config summary and plot, for a parent run or an experiment."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from nsa_lab.cli import main
from nsa_lab.config import load_config
from nsa_lab.models.flops import config_attended_tokens
from nsa_lab.tracking.loss_by_position import position_buckets
from nsa_lab.tracking.report import PLOT_NAME, POSITION_PLOT_NAME
from tests.conftest import SMOKE
from tests.test_sweep_e2e import (
    TINY,
    mlflow_runs,
    one_thread,  # noqa: F401  (fixture)
    uri_in,
)
from tests.test_sweep_spec import write_spec

pytestmark = pytest.mark.slow


def table_rows(markdown: str, first_cell: str) -> dict[str, list[str]]:
    """Rows of the main markdown table whose first cell starts with ``first_cell``."""
    rows = {}
    for line in markdown.split("\n## ")[0].splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("|") and cells[0].startswith(first_cell):
            rows[cells[0] + " " + cells[3]] = cells
    return rows


@pytest.mark.usefixtures("one_thread")
def test_report_of_parent_run_and_of_experiment(workdir: Path, capsys):
    path = write_spec(
        workdir,
        name="rep",
        fixed=TINY,
        space={"attn.name": ["full", "window"], "train.seed": [0, 1]},
    )
    uri = uri_in(workdir)
    assert main(["sweep", str(path), uri]) == 0
    [parent], children = mlflow_runs(workdir, "rep")
    capsys.readouterr()

    out = workdir / "out"
    assert main(["report", parent.info.run_id, uri, "--out", str(out)]) == 0
    markdown = capsys.readouterr().out
    assert (out / "report.md").read_text() == markdown
    assert (out / PLOT_NAME).read_bytes()[:4] == b"\x89PNG"
    assert (out / POSITION_PLOT_NAME).read_bytes()[:4] == b"\x89PNG"

    rows = table_rows(markdown, "rep-")
    assert len(rows) == 4
    val = {}
    for child in children:
        cells = next(r for r in rows.values() if r[0] == child.info.run_name)
        variant, seed = child.data.params["attn.name"], child.data.params["train.seed"]
        assert cells[1:4] == [variant, "-" if variant == "full" else "w=16", seed]
        assert cells[5] == f"{child.data.metrics['val/loss']:.4f}"
        cfg = load_config([SMOKE], [f"attn.name={variant}"])
        assert cells[7] == f"{config_attended_tokens(cfg):.1f}"
        val.setdefault(variant, []).append(child.data.metrics["val/loss"])
    losses = [float(r[5]) for r in rows.values()]
    assert losses == sorted(losses)

    summary = markdown.split("## Per config, over seeds")[1]
    for variant, values in val.items():
        [line] = [ln for ln in summary.splitlines() if ln.startswith(f"| {variant} |")]
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[2] == "2" and cells[3] == f"{statistics.fmean(values):.4f}"
        assert cells[4:6] == [f"{min(values):.4f}", f"{max(values):.4f}"]

    assert_position_table(markdown, children)

    client = MlflowClient(uri.partition("=")[2])
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert logged == {"report/report.md", f"report/{PLOT_NAME}", f"report/{POSITION_PLOT_NAME}"}
    for child in children:  # each training run has its own plot of its last validation
        assert "loss_by_position.png" in {a.path for a in client.list_artifacts(child.info.run_id)}

    assert main(["report", "rep", uri]) == 0  # by experiment: its own "report" run
    assert len(table_rows(capsys.readouterr().out, "rep-")) == 4
    reports = client.search_runs(
        [parent.info.experiment_id], "tags.`sweep.kind` = 'report'", max_results=10
    )
    assert len(reports) == 1 and reports[0].info.status == "FINISHED"
    assert main(["report", "rep", uri]) == 0  # a report run is not itself reported
    assert len(table_rows(capsys.readouterr().out, "rep")) == 4
    assert_report_at_an_earlier_step(client, uri, children, capsys)


def assert_report_at_an_earlier_step(client: MlflowClient, uri: str, children, capsys) -> None:
    """``--step N``: values of each run's last validation at or before N, cut runs included."""
    history = {
        c.info.run_name: {
            m.step: m.value for m in client.get_metric_history(c.info.run_id, "val/loss")
        }
        for c in children
    }
    first = min(min(steps) for steps in history.values())
    cut = children[0]
    client.set_terminated(cut.info.run_id, status="FAILED")  # as a run cut by a time limit
    assert main(["report", "rep", uri]) == 0
    assert cut.info.run_name not in {r[0] for r in table_rows(capsys.readouterr().out, "rep")}
    assert main(["report", "rep", uri, "--step", str(first)]) == 0
    rows = table_rows(capsys.readouterr().out, "rep-")
    assert len(rows) == 4
    for cells in rows.values():
        assert cells[4] == str(first)
        assert cells[5] == f"{history[cells[0]][first]:.4f}"
        params = next(c for c in children if c.info.run_name == cells[0]).data.params
        assert cells[10] == f"{int(params['model.n_params']) / 1e6:.1f}M"
    assert main(["report", "rep", uri, "--step", "-1"]) == 2


def assert_position_table(markdown: str, children) -> None:
    """The loss-by-position table holds each run's last logged value of every bucket."""
    buckets = position_buckets(int(children[0].data.params["data.seq_len"]))
    section = markdown.split("## Validation loss by position")[1]
    lines = [ln for ln in section.splitlines() if ln.startswith("|")]
    assert [c.strip() for c in lines[0].strip("|").split("|")][3:] == [b.label for b in buckets]
    for child in children:
        [line] = [ln for ln in lines if ln.startswith(f"| {child.info.run_name} |")]
        cells = [c.strip() for c in line.strip("|").split("|")]
        metrics = child.data.metrics
        assert cells[3:] == [f"{metrics[b.metric]:.4f}" for b in buckets]
        weighted = sum(b.size * metrics[b.metric] for b in buckets) / buckets[-1].end
        assert weighted == pytest.approx(metrics["val/loss"], rel=1e-5)


def test_report_of_unknown_target_is_a_clear_error(workdir: Path, capsys):
    assert main(["report", "no-such-experiment", uri_in(workdir)]) == 2
    assert "no-such-experiment" in capsys.readouterr().err
    assert main(["report", "0" * 32, uri_in(workdir)]) == 2
    assert "no run with this id" in capsys.readouterr().err
