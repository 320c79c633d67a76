"""Needle results: the accuracy grid, its table, files, heatmap and MLflow metrics.

Metric names (read by other tools, keep them stable): ``needle/acc`` (mean over
all cells), ``needle/acc_len_<L>`` (mean over the depths at length ``L``) and
``needle/acc_<L>_<depth %>`` (one cell, e.g. ``needle/acc_1024_50``). Artifacts
go under ``needle/``: ``needle_results.json``, ``needle_results.csv``,
``needle_heatmap.png``.
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from mlflow.entities import Metric  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from nsa_lab.files import write_atomic  # noqa: E402

ARTIFACT_DIR = "needle"
JSON_NAME = "needle_results.json"
CSV_NAME = "needle_results.csv"
HEATMAP_NAME = "needle_heatmap.png"
CSV_FIELDS = ("length", "depth", "trials", "correct", "acc")
_MLFLOW_BATCH_LIMIT = 1000  # metrics per log_batch call


@dataclass(frozen=True)
class CellResult:
    """Exact-match outcome of ``trials`` needles at one (context length, depth)."""

    length: int
    depth: float
    trials: int
    correct: int

    @property
    def acc(self) -> float:
        return self.correct / self.trials


@dataclass
class NeedleResults:
    """All cells of one evaluation, plus what was evaluated (``meta``: run id, step, ...)."""

    cells: list[CellResult]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def lengths(self) -> list[int]:
        return sorted({c.length for c in self.cells})

    @property
    def depths(self) -> list[float]:
        return sorted({c.depth for c in self.cells})

    @property
    def acc(self) -> float:
        """Mean accuracy over cells (every cell has the same number of trials)."""
        return sum(c.acc for c in self.cells) / len(self.cells)

    def acc_at_length(self, length: int) -> float:
        cells = [c for c in self.cells if c.length == length]
        return sum(c.acc for c in cells) / len(cells)

    def cell(self, length: int, depth: float) -> CellResult:
        return next(c for c in self.cells if c.length == length and c.depth == depth)

    def metrics(self) -> dict[str, float]:
        """The MLflow metrics named in the module docstring."""
        out = {"needle/acc": self.acc}
        out.update({f"needle/acc_len_{n}": self.acc_at_length(n) for n in self.lengths})
        out.update({f"needle/acc_{c.length}_{depth_percent(c.depth)}": c.acc for c in self.cells})
        return out

    @classmethod
    def from_json(cls, text: str) -> NeedleResults:
        """Read back what :meth:`to_json` wrote (e.g. a downloaded artifact)."""
        data = json.loads(text)
        cells = [
            CellResult(c["length"], c["depth"], c["trials"], c["correct"]) for c in data["cells"]
        ]
        derived = {"acc", "acc_by_length", "cells"}
        return cls(cells, {k: v for k, v in data.items() if k not in derived})

    def to_json(self) -> str:
        return json.dumps(
            {
                **self.meta,
                "acc": self.acc,
                "acc_by_length": {str(n): self.acc_at_length(n) for n in self.lengths},
                "cells": [{**asdict(c), "acc": c.acc} for c in self.cells],
            },
            indent=2,
        )

    def to_csv(self) -> str:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(CSV_FIELDS)
        for c in self.cells:
            writer.writerow([c.length, c.depth, c.trials, c.correct, f"{c.acc:.4f}"])
        return buffer.getvalue()


def depth_percent(depth: float) -> str:
    """``0.5 -> "50"``, ``0.125 -> "12.5"``: depths as they appear in names and tables."""
    return f"{depth * 100:g}"


def markdown_table(results: NeedleResults, title: str = "") -> str:
    """Accuracy (%) with a row per depth and a column per length, then the means."""
    lengths = results.lengths
    lines = [f"**{title}**", ""] if title else []
    lines.append("| depth \\ length | " + " | ".join(str(n) for n in lengths) + " |")
    lines.append("|---" * (len(lengths) + 1) + "|")
    for depth in results.depths:
        row = [f"{100 * results.cell(n, depth).acc:.0f}" for n in lengths]
        lines.append(f"| {depth_percent(depth)}% | " + " | ".join(row) + " |")
    means = [f"{100 * results.acc_at_length(n):.1f}" for n in lengths]
    lines.append("| **mean** | " + " | ".join(means) + " |")
    trials = results.cells[0].trials
    lines += ["", f"Overall {100 * results.acc:.1f}% ({trials} needles per cell)."]
    return "\n".join(lines)


def plot_heatmap(results: NeedleResults, path: str | Path, title: str = "") -> None:
    """The usual needle-in-a-haystack picture: depth (rows) by context length (columns)."""
    lengths, depths = results.lengths, results.depths
    grid = [[results.cell(n, d).acc for n in lengths] for d in depths]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.2 + 0.4 * len(depths)))
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    for i, row in enumerate(grid):
        for j, acc in enumerate(row):
            ax.text(j, i, f"{100 * acc:.0f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{depth_percent(d)}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title or f"needle retrieval, {100 * results.acc:.1f}% overall", fontsize=10)
    fig.colorbar(image, ax=ax, label="exact-match accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(results: NeedleResults, out_dir: str | Path, title: str = "") -> list[Path]:
    """JSON, CSV and heatmap into ``out_dir``, each written whole or not at all."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / JSON_NAME, out / CSV_NAME, out / HEATMAP_NAME]
    write_atomic(paths[0], lambda p: p.write_text(results.to_json()))
    write_atomic(paths[1], lambda p: p.write_text(results.to_csv()))
    write_atomic(paths[2], lambda p: plot_heatmap(results, p, title))
    return paths


def log_results(
    client: MlflowClient, run_id: str, results: NeedleResults, step: int, title: str = ""
) -> None:
    """Metrics at ``step`` (the checkpoint's training step) and the files under ``needle/``."""
    now = int(time.time() * 1000)
    metrics = [Metric(key, value, now, step) for key, value in results.metrics().items()]
    for start in range(0, len(metrics), _MLFLOW_BATCH_LIMIT):
        client.log_batch(run_id, metrics=metrics[start : start + _MLFLOW_BATCH_LIMIT])
    with tempfile.TemporaryDirectory() as tmp:
        for path in write_results(results, tmp, title):
            client.log_artifact(run_id, str(path), artifact_path=ARTIFACT_DIR)
