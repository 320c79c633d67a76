"""Study-level artifacts: Optuna's matplotlib plots and a CSV of every trial.

Plots come from ``optuna.visualization.matplotlib`` (matplotlib is already a
dependency; no plotly). Parameter importances use Optuna's default evaluator, which in
Optuna 5 is PED-ANOVA and needs no scikit-learn. A plot Optuna cannot draw yet (one
finished trial, a single parameter value, ...) is skipped and the reason written to
``plots_skipped.txt``, so a small study never fails at its very end.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optuna  # noqa: E402
from optuna.trial import FrozenTrial  # noqa: E402
from optuna.visualization import matplotlib as ovm  # noqa: E402

from nsa_lab.files import write_atomic  # noqa: E402
from nsa_lab.sweeps.spec import SweepSpec  # noqa: E402


def write_study_artifacts(study: optuna.Study, spec: SweepSpec, folder: Path) -> None:
    """``trials.csv`` and one PNG per plot into ``folder`` (each written whole, then renamed)."""
    _write_trials_csv(study, folder / "trials.csv")
    skipped = []
    for name, draw in _plots(study, spec).items():
        try:
            with warnings.catch_warnings():  # experimental-API and layout notices
                warnings.simplefilter("ignore")
                _save(draw(), folder / f"{name}.png")
        except Exception as exc:  # any plotting failure is only a note
            skipped.append(f"{name}: {type(exc).__name__}: {exc}")
        finally:
            plt.close("all")
    if skipped:
        (folder / "plots_skipped.txt").write_text("\n".join(skipped) + "\n")


def _plots(study: optuna.Study, spec: SweepSpec) -> dict[str, Callable[[], Any]]:
    """The plots of the first objective; the Pareto front too when there are several."""
    metric = spec.objectives[0].metric
    target: Callable[[FrozenTrial], float] | None = None
    if len(spec.objectives) > 1:
        target = _objective_value(0)
    kw = {"target": target, "target_name": metric}
    plots: dict[str, Callable[[], Any]] = {
        "optimization_history": lambda: ovm.plot_optimization_history(study, **kw),
        "param_importances": lambda: ovm.plot_param_importances(study, **kw),
        "parallel_coordinate": lambda: ovm.plot_parallel_coordinate(study, **kw),
        "slice": lambda: ovm.plot_slice(study, **kw),
    }
    if len(spec.objectives) > 1:
        names = [o.metric for o in spec.objectives]
        plots["pareto_front"] = lambda: ovm.plot_pareto_front(study, target_names=names)
    return plots


def _objective_value(index: int) -> Callable[[FrozenTrial], float]:
    return lambda trial: trial.values[index]


def _save(axes: Any, path: Path) -> None:
    first = np.asarray(axes).flat[0]
    fig = first.figure
    fig.set_size_inches(max(fig.get_size_inches()[0], 8), max(fig.get_size_inches()[1], 5))
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110))


def _write_trials_csv(study: optuna.Study, path: Path) -> None:
    frame = study.trials_dataframe(multi_index=False)
    write_atomic(path, lambda tmp: frame.to_csv(tmp, index=False))
