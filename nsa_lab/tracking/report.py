"""``nsa-lab report``: compare the runs of an experiment or of a sweep's parent run.

Writes a markdown table (final validation loss, needle accuracy when logged, training
tokens/s, MFU, peak GPU memory, parameters, attended tokens per query), when runs
repeat a config over seeds a summary per config, and when runs logged it a table of the
last validation's loss by position bucket; plus one plot of every run's validation-loss
curve and one of every run's loss by position. All go to stdout / ``--out`` and into
MLflow: under ``report/`` of the parent run, or of a new run named ``report`` (tag
``sweep.kind=report``) when the target is an experiment.

``at_step`` (``--step N``) compares runs at equal steps, hence equal tokens when they
share batch and context: every value is read at each run's last validation at or before
step N, and runs cut before their end (a time limit, a crash) are compared too, since
what they logged up to N is as valid as a finished run's.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
from cycler import cycler
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from nsa_lab.config import ConfigError
from nsa_lab.files import write_atomic
from nsa_lab.models.flops import AttnShape, attended_tokens_per_query
from nsa_lab.tracking.loss_by_position import PositionBucket, logged_losses_by_position
from nsa_lab.tracking.mlflow_run import RUN_ID
from nsa_lab.tracking.plots import plot_loss_by_position, plot_loss_curves

NEEDLE_METRIC = "needle/acc"
NOT_COMPARED = ("study", "report")  # sweep.kind of runs that are not trainings
SUPERSEDED = ("interrupted", "killed")  # sweep.outcome of trials the sweep redoes
# Params that differ between repeats of one config (seed) or only name the run.
GROUP_IGNORED = (
    "train.seed",
    "tracking.run_name",
    "tracking.experiment",
    "tracking.uri",
    "train.ckpt_dir",
    "train.resume",
)
PLOT_NAME = "val_loss_curves.png"
POSITION_PLOT_NAME = "loss_by_position.png"


@dataclass(frozen=True)
class RunRow:
    run_id: str
    name: str
    variant: str
    blocks: str
    seed: str
    val_step: int | None
    val_loss: float | None
    needle_acc: float | None
    tokens_per_s: float | None
    mfu: float | None
    peak_mem_gib: float | None
    n_params: int | None
    attended: float | None
    state: str
    group: tuple[tuple[str, str], ...]
    val_curve: tuple[tuple[int, float], ...]
    by_position: tuple[tuple[PositionBucket, float], ...]  # the last validation's


def write_report(
    target: str, tracking_uri: str, out_dir: str | None = None, at_step: int | None = None
) -> str:
    """Build the report for ``target`` (experiment name or parent run id), log it to
    MLflow, optionally write it into ``out_dir``; returns the markdown. ``at_step``: see
    the module doc."""
    client = MlflowClient(tracking_uri)
    runs, parent_id, experiment_id = find_runs(client, target, tracking_uri)
    kept = [r for r in runs if not superseded(r, at_step is not None)]
    rows = [run_row(client, r, at_step) for r in kept]
    rows = sorted((r for r in rows if at_step is None or r.val_step is not None), key=_by_val_loss)
    markdown = render_markdown(target, rows, left_out=len(runs) - len(rows), at_step=at_step)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "report.md").write_text(markdown)
        plot_val_curves(rows, folder / PLOT_NAME)
        if any(r.by_position for r in rows):
            plot_position_curves(rows, folder / POSITION_PLOT_NAME)
        run_id = parent_id or _report_run(client, experiment_id)
        client.log_artifacts(run_id, tmp, artifact_path="report")
        if parent_id is None:
            client.set_terminated(run_id, status="FINISHED")
        if out_dir:
            _copy_atomically(folder, Path(out_dir))
    return markdown


def find_runs(client: MlflowClient, target: str, uri: str) -> tuple[list[Run], str | None, str]:
    """The runs to compare, the parent run id (None for an experiment) and the experiment."""
    if RUN_ID.match(target):
        try:
            parent = client.get_run(target)
        except MlflowException:
            raise ConfigError("report", target, f"no run with this id in {uri}") from None
        experiment_id = parent.info.experiment_id
        runs = _search(client, experiment_id, f"tags.mlflow.parentRunId = '{target}'")
        return runs, target, experiment_id
    experiment = client.get_experiment_by_name(target)
    if experiment is None:
        raise ConfigError("report", target, f"no experiment of that name and no run id in {uri}")
    runs = _search(client, experiment.experiment_id, "")
    return runs, None, experiment.experiment_id


def _search(client: MlflowClient, experiment_id: str, filter_string: str) -> list[Run]:
    runs = client.search_runs([experiment_id], filter_string, max_results=5000)
    return [r for r in runs if r.data.tags.get("sweep.kind") not in NOT_COMPARED]


def superseded(run: Run, unfinished_ok: bool = False) -> bool:
    """A sweep trial that was interrupted or lost its worker: the sweep redoes it, so
    counting it too would compare one config twice. Also a run that never ended, unless
    ``unfinished_ok`` (a comparison at a step it reached)."""
    outcome = run.data.tags.get("sweep.outcome")
    unfinished = outcome is None and run.info.status != "FINISHED"
    return outcome in SUPERSEDED or (unfinished and not unfinished_ok)


def run_row(client: MlflowClient, run: Run, at_step: int | None = None) -> RunRow:
    """What the report shows of ``run``: its last values, or those at ``at_step``."""
    params, tags = run.data.params, run.data.tags

    def history(key: str) -> list:
        logged = client.get_metric_history(run.info.run_id, key)
        return [m for m in logged if at_step is None or m.step <= at_step]

    val_history = history("val/loss")
    val_step = max((m.step for m in val_history), default=None)
    metrics = dict(run.data.metrics)
    if at_step is not None:  # the values of the last validation at or before the step
        validated = [k for k in metrics if k.startswith("val/")]
        metrics = {k: m.value for k in validated for m in history(k) if m.step == val_step}
    speed = [m.value for m in history("train/tokens_per_s")]
    mfu = [m.value for m in history("train/mfu")]
    memory = [m.value for m in history("train/peak_mem_gib")]
    return RunRow(
        run_id=run.info.run_id,
        name=run.info.run_name or run.info.run_id[:8],
        variant=params.get("attn.name", tags.get("variant", "?")),
        blocks=_blocks(params),
        seed=params.get("train.seed", "-"),
        val_step=val_step,
        val_loss=metrics.get("val/loss"),
        needle_acc=None if at_step is not None else metrics.get(NEEDLE_METRIC),
        tokens_per_s=statistics.median(speed) if speed else None,
        mfu=statistics.median(mfu) if mfu else None,
        peak_mem_gib=max(memory, default=None),
        n_params=int(params["model.n_params"]) if "model.n_params" in params else None,
        attended=_attended(params),
        state=tags.get("sweep.outcome", run.info.status.lower()),
        group=tuple(sorted((k, v) for k, v in params.items() if k not in GROUP_IGNORED)),
        val_curve=tuple((m.step, m.value) for m in val_history),
        by_position=tuple(_by_position(metrics, params)),
    )


def _by_position(
    metrics: Mapping[str, float], params: Mapping[str, str]
) -> list[tuple[PositionBucket, float]]:
    seq_len = params.get("data.seq_len", "")
    return logged_losses_by_position(metrics, int(seq_len)) if seq_len.isdigit() else []


def _blocks(params: Mapping[str, str]) -> str:
    """``l/d/l'/n/w`` for NSA variants, ``w=..`` for a window, ``-`` for dense attention."""
    name = params.get("attn.name", "")
    if name == "full":
        return "-"
    if name == "window":
        return f"w={params.get('attn.w', '?')}"
    return "/".join(params.get(f"attn.{k}", "?") for k in ("l", "d", "l_sel", "n", "w"))


def _attended(params: Mapping[str, str]) -> float | None:
    attn = {k.removeprefix("attn."): v for k, v in params.items() if k.startswith("attn.")}
    try:
        shape = AttnShape.from_config(attn)
        return attended_tokens_per_query(shape, int(params["data.seq_len"]))
    except (KeyError, TypeError, ValueError):  # not an nsa-lab training run
        return None


def _by_val_loss(row: RunRow) -> tuple[bool, float]:
    return row.val_loss is None, row.val_loss if row.val_loss is not None else 0.0


def render_markdown(
    target: str, rows: Sequence[RunRow], left_out: int = 0, at_step: int | None = None
) -> str:
    needle = any(r.needle_acc is not None for r in rows)
    dropped = f" ({left_out} interrupted or unfinished runs left out)" if left_out else ""
    if at_step is not None:
        dropped = f" ({left_out} left out)" if left_out else ""
        when = f"by validation loss at the last validation at or before step {at_step}"
    else:
        when = "by final validation loss"
    lines = [
        f"# Report: {target}",
        "",
        f"{len(rows)} runs{dropped}, sorted {when} (nats per token). "
        "tokens/s, MFU: medians of train/tokens_per_s and train/mfu; peak GiB: the largest "
        "train/peak_mem_gib; attended/query: mean keys a query attends to at data.seq_len "
        "(nsa_lab/models/flops.py); blocks: l/d/l'/n/w.",
        "",
    ]
    head = ["run", "variant", "blocks", "seed", "val step", "val loss"]
    head += ["needle acc"] * needle
    head += ["tokens/s", "attended/query", "MFU", "peak GiB", "params", "state"]
    table = [head]
    for r in rows:
        cells = [
            r.name,
            r.variant,
            r.blocks,
            r.seed,
            _fmt(r.val_step, "d"),
            _fmt(r.val_loss, ".4f"),
        ]
        cells += [_fmt(r.needle_acc, ".3f")] * needle
        cells += [
            _fmt(r.tokens_per_s, ",.0f"),
            _fmt(r.attended, ".1f"),
            "-" if r.mfu is None else f"{100 * r.mfu:.1f}%",
            _fmt(r.peak_mem_gib, ".2f"),
            "-" if r.n_params is None else f"{r.n_params / 1e6:.1f}M",
            r.state,
        ]
        table.append(cells)
    lines += _table(table)
    summary = _summary(rows)
    if summary:
        lines += ["", "## Per config, over seeds", "", *_table(summary)]
    by_position = _position_table(rows)
    if by_position:
        lines += [
            "",
            "## Validation loss by position",
            "",
            f"{'Last validation' if at_step is None else f'Validation at or before step {at_step}'}"
            " of each run, mean loss of the target positions in each bucket "
            "(val/loss_pos/*, nats per token).",
            "",
            *_table(by_position),
        ]
    return "\n".join(lines) + "\n"


def _position_table(rows: Sequence[RunRow]) -> list[list[str]]:
    """One line per run that logged loss by position, a column per bucket any run has."""
    logged = [r for r in rows if r.by_position]
    if not logged:
        return []
    buckets = sorted({b for r in logged for b, _ in r.by_position}, key=lambda b: (b.start, b.end))
    table = [["run", "variant", "seed", *(b.label for b in buckets)]]
    for r in logged:
        values = dict(r.by_position)
        cells = [_fmt(values.get(b), ".4f") for b in buckets]
        table.append([r.name, r.variant, r.seed, *cells])
    return table


def _summary(rows: Sequence[RunRow]) -> list[list[str]]:
    """One line per config run with several seeds: mean and range of the val loss."""
    groups: dict[tuple, list[RunRow]] = {}
    for r in rows:
        groups.setdefault(r.group, []).append(r)
    repeated = [g for g in groups.values() if len(g) > 1]
    if not repeated:
        return []
    table = [["variant", "blocks", "runs", "val loss mean", "min", "max", "tokens/s", "attended"]]
    lines = []
    for g in repeated:
        losses = [r.val_loss for r in g if r.val_loss is not None]
        speeds = [r.tokens_per_s for r in g if r.tokens_per_s is not None]
        mean = statistics.fmean(losses) if losses else None
        lines.append(
            (
                mean if mean is not None else float("inf"),
                [
                    g[0].variant,
                    g[0].blocks,
                    str(len(g)),
                    _fmt(mean, ".4f"),
                    _fmt(min(losses, default=None), ".4f"),
                    _fmt(max(losses, default=None), ".4f"),
                    _fmt(statistics.fmean(speeds) if speeds else None, ",.0f"),
                    _fmt(g[0].attended, ".1f"),
                ],
            )
        )
    return table + [cells for _, cells in sorted(lines, key=lambda item: item[0])]


def _fmt(value: float | int | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    head, *body = rows
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return out + ["| " + " | ".join(cells) + " |" for cells in body]


def plot_val_curves(rows: Sequence[RunRow], path: Path) -> None:
    """Every run's validation loss on one axes, labelled as :func:`_curve_labels` says."""
    curves = {label: {"val/loss": list(r.val_curve)} for label, r in _curve_labels(rows)}
    with _paired_colours():
        plot_loss_curves(curves, path)


def plot_position_curves(rows: Sequence[RunRow], path: Path) -> None:
    """Every run's last loss by position on one axes, labelled and coloured like the
    validation curves."""
    curves = {label: list(r.by_position) for label, r in _curve_labels(rows) if r.by_position}
    with _paired_colours():
        plot_loss_by_position(curves, path)


def _curve_labels(rows: Sequence[RunRow]) -> list[tuple[str, RunRow]]:
    """Runs in (config, seed) order, labelled by variant (or blocks) and seed; runs that
    would share a label (e.g. two model sizes of one variant) all carry their run name."""
    one_variant = len({r.variant for r in rows}) == 1
    ordered = sorted(rows, key=lambda r: (r.variant, r.blocks, r.seed))
    short = [
        f"{r.blocks if one_variant and r.blocks != '-' else r.variant} s{r.seed}" for r in ordered
    ]
    return [
        (label if short.count(label) == 1 else f"{label} ({r.name})", r)
        for label, r in zip(short, ordered, strict=True)
    ]


def _paired_colours() -> contextlib.AbstractContextManager:
    """Matplotlib's paired ``tab20`` colours: in :func:`_curve_labels` order, the seeds of
    one config share a hue (dark, light) and 14 ablation runs stay distinct."""
    return matplotlib.rc_context(
        {"axes.prop_cycle": cycler(color=matplotlib.colormaps["tab20"].colors)}
    )


def _report_run(client: MlflowClient, experiment_id: str) -> str:
    run = client.create_run(experiment_id, run_name="report", tags={"sweep.kind": "report"})
    return run.info.run_id


def _copy_atomically(folder: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for src in folder.iterdir():
        write_atomic(out / src.name, lambda tmp, src=src: tmp.write_bytes(src.read_bytes()))
