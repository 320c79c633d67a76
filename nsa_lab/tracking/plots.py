"""Figures logged as MLflow artifacts (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

Curve = list[tuple[int, float]]


def plot_loss_curves(runs: dict[str, dict[str, Curve]], path: str | Path) -> None:
    """One axes of loss against step; a line per (run label, metric), val dashed-with-markers.

    ``runs`` maps a run label ("" for a single run) to ``{metric name: [(step, value)]}``.
    """
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, metrics in runs.items():
        for metric, points in metrics.items():
            if not points:
                continue
            steps, values = zip(*sorted(points), strict=True)
            is_val = metric.startswith("val")
            name = f"{label} {metric}".strip()
            ax.plot(steps, values, "o--" if is_val else "-", ms=3, lw=1.2, label=name, alpha=0.9)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
