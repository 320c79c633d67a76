"""Before any trial: is there anything valid to train, and what exactly is the budget?

A grid is enumerated in full: invalid points are dropped (and listed), a value that no
valid point uses is a spec error, and the budget is the number of valid points. Other
samplers get a probe: the finite space enumerated, or random draws, until one valid
trial config turns up; if none does, the constraints are impossible and the sweep stops
here, before a study or a run exists.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import NoReturn

import optuna
from omegaconf import DictConfig

from nsa_lab.config import ConfigError
from nsa_lab.sweeps.constraints import checked_config
from nsa_lab.sweeps.space import Scalar, as_override, grid, grid_size, suggest
from nsa_lab.sweeps.spec import SweepSpec

PROBE_DRAWS = 200  # random draws tried before declaring a continuous space impossible
MAX_GRID = 5000  # points a grid may have: each is checked up front (~25 ms each)

Params = Mapping[str, Scalar]


@dataclass(frozen=True)
class SweepPlan:
    spec: SweepSpec
    n_trials: int
    tracking_uri: str  # where the trials log (the same for all: not searchable)
    grid_points: tuple[dict[str, Scalar], ...] | None  # valid points, in spec order (grid)
    skipped: tuple[tuple[dict[str, Scalar], str], ...] = ()  # invalid grid points, why


def trial_config(spec: SweepSpec, params: Params) -> DictConfig:
    """The validated config of one trial, or ConfigError with the rule it breaks."""
    overrides = [*spec.overrides, *(as_override(k, v) for k, v in params.items())]
    return checked_config(spec.base, overrides, spec.all_constraints)


def plan_sweep(spec: SweepSpec) -> SweepPlan:
    if spec.grid:
        return _plan_grid(spec)
    example = _find_valid(spec)
    _check_example(spec, example)
    return SweepPlan(spec, spec.trials or 0, example.tracking.uri, None)


def _plan_grid(spec: SweepSpec) -> SweepPlan:
    size = grid_size(spec.space)
    if size > MAX_GRID:
        raise ConfigError("space", size, f"a grid of more than {MAX_GRID} points; use tpe/random")
    valid, skipped = [], []
    example = None
    for point in grid(spec.space):
        try:
            cfg = trial_config(spec, point)
        except ConfigError as exc:
            skipped.append((point, str(exc)))
            continue
        valid.append(point)
        example = example or cfg
    if not valid:
        _impossible(spec, size, [why for _, why in skipped])
    _check_every_value_used(spec, valid, skipped)
    _check_example(spec, example)
    n_trials = min(spec.trials or len(valid), len(valid))
    return SweepPlan(spec, n_trials, example.tracking.uri, tuple(valid), tuple(skipped))


def _check_every_value_used(
    spec: SweepSpec, valid: list[dict[str, Scalar]], skipped: list[tuple[dict, str]]
) -> None:
    """A value that no valid point uses is a typo or a contradiction, not a choice."""
    for p in spec.space:
        used = {repr(point[p.key]) for point in valid}
        for value in p.values():
            if repr(value) not in used:
                why = next(w for point, w in skipped if point[p.key] == value)
                raise ConfigError(
                    f"space.{p.key}", value, f"no valid trial uses this value; e.g. {why}"
                )


def _find_valid(spec: SweepSpec) -> DictConfig:
    """The first valid trial config of the space (exhaustive if small, else random draws)."""
    exhaustive = all(p.finite for p in spec.space) and grid_size(spec.space) <= PROBE_DRAWS
    candidates = grid(spec.space) if exhaustive else _random_draws(spec)
    reasons = []
    for params in candidates:
        try:
            return trial_config(spec, params)
        except ConfigError as exc:
            reasons.append(str(exc))
    _impossible(spec, len(reasons), reasons)


def _random_draws(spec: SweepSpec) -> Iterable[dict[str, Scalar]]:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(PROBE_DRAWS):
        yield suggest(study.ask(), spec.space)


def _impossible(spec: SweepSpec, tried: int, reasons: list[str]) -> NoReturn:
    common = "; ".join(f"{why} ({n}x)" for why, n in Counter(reasons).most_common(3))
    raise ConfigError(
        "constraints",
        spec.name,
        f"impossible: none of {tried} trial configs tried is valid. Most common: {common}",
    )


def _check_example(spec: SweepSpec, example: DictConfig) -> None:
    """Rules about the fixed part of the config, checked on one valid trial config."""
    train = example.train
    if train.devices not in ("auto", "1") or train.num_nodes != 1:
        raise ConfigError(
            "train.devices",
            train.devices,
            "a sweep trial runs on one device; run one `nsa-lab sweep` per GPU "
            "(CUDA_VISIBLE_DEVICES) to use several",
        )
    needle = [o.metric for o in spec.objectives if o.metric.startswith("needle/")]
    if needle and not example.train.eval_needle:
        raise ConfigError("objectives", needle[0], "needs train.eval_needle=true in base or fixed")
