"""Figures logged as MLflow artifacts (matplotlib, headless)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import NullLocator  # noqa: E402

from nsa_lab.tracking.loss_by_position import PositionBucket, tokens_label  # noqa: E402

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


def plot_loss_by_position(
    runs: dict[str, Sequence[tuple[PositionBucket, float]]], path: str | Path
) -> None:
    """Loss against target position, a point per bucket, a line per run label ("" for a
    single run).

    The axis is log-scaled and ticked at the bucket ends; a bucket's point sits at its
    geometric middle, so doubling buckets are evenly spaced.
    """
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ends: set[int] = set()
    for label, points in runs.items():
        if not points:
            continue
        middles = [_log_middle(b) for b, _ in points]
        ax.plot(middles, [v for _, v in points], "o-", ms=4, lw=1.2, label=label or None)
        ends.update(b.end for b, _ in points)
    ax.set_xscale("log")
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticks(sorted(ends), [tokens_label(n) for n in sorted(ends)], fontsize=8)
    ax.set_xlabel("target position (log scale; a point per bucket, between its ends)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.grid(alpha=0.3)
    if any(runs):
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _log_middle(bucket: PositionBucket) -> float:
    """The bucket's geometric middle; the first bucket, which starts at 0, counts from
    half its end (where the doubling buckets would put its start)."""
    return math.sqrt(max(bucket.start, bucket.end / 2) * bucket.end)
