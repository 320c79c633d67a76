"""Sweep specs (``sweeps/*.yaml``): schema, defaults and validation.

A spec names a base experiment, fixed overrides, a search space over any config key,
extra constraints, the objective(s), the sampler and the pruner::

    name: nsa_blocks                      # study name (default: the file's stem)
    experiment: nsa_blocks                # MLflow experiment (default: name)
    base: [experiments/default.yaml]      # YAML files, merged left to right
    fixed: {train.max_steps: 300}         # overrides applied to every trial
    space: {attn.l: [16, 32], attn.n: {low: 4, high: 16, step: 4}}
    constraints: ["attn.n * attn.l_sel <= 256"]
    objectives: [val/loss]                # or {metric: ..., direction: ...} items
    sampler: {type: tpe, seed: 0}         # tpe | random | grid
    pruner: {type: median}                # none | median | hyperband
    trials: 20                            # total finished trials the study should hold
    workers: 1
    storage: null                         # RDB URL; default: optuna.db beside mlflow.db
    keep_checkpoints: false

Everything is checked here, before any trial exists: unknown fields or config keys,
malformed ranges, an empty space, bad sampler or pruner settings, constraint syntax,
objective names. Whether any valid trial exists at all is checked by
:func:`nsa_lab.sweeps.plan.plan_sweep`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import optuna
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nsa_lab.config import ConfigError, flatten, flatten_keys, load_config
from nsa_lab.sweeps.constraints import Constraint, context_rules, parse_constraint
from nsa_lab.sweeps.gpus import parse_gpus, visible_gpus
from nsa_lab.sweeps.space import ParamSpec, as_override, parse_param

FIELDS = (
    "name",
    "description",
    "experiment",
    "base",
    "fixed",
    "space",
    "constraints",
    "objective",
    "objectives",
    "sampler",
    "pruner",
    "trials",
    "workers",
    "storage",
    "keep_checkpoints",
)
# Keys the sweep sets itself for every trial (checkpoints go to <train.ckpt_dir>/<study>/).
RESERVED_KEYS = ("tracking.experiment", "tracking.run_name", "train.resume")
# Objectives computed from the trial's config rather than read from its MLflow run.
DERIVED_OBJECTIVES = ("attended_tokens_per_query",)
METRIC_PREFIXES = ("val/", "train/", "needle/")
SAMPLERS: dict[str, type[optuna.samplers.BaseSampler]] = {
    "tpe": optuna.samplers.TPESampler,
    "random": optuna.samplers.RandomSampler,
    # A grid is enqueued point by point (see runner); the sampler never draws.
    "grid": optuna.samplers.RandomSampler,
}
PRUNERS: dict[str, type[optuna.pruners.BasePruner]] = {
    "none": optuna.pruners.NopPruner,
    "median": optuna.pruners.MedianPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
}
PRUNED_METRIC = "val/loss"  # what the pruners see during training


@dataclass(frozen=True)
class Objective:
    metric: str
    direction: str  # minimize | maximize

    @property
    def derived(self) -> bool:
        return self.metric in DERIVED_OBJECTIVES


@dataclass(frozen=True)
class SweepSpec:
    """A validated spec plus the command line's overrides, trial count, workers and GPUs.

    ``gpus`` holds the ``CUDA_VISIBLE_DEVICES`` value of each GPU the workers are pinned
    to (empty: no pinning); worker ``i`` gets ``gpus[i % len(gpus)]``.
    """

    name: str
    source: Path
    experiment: str
    base: tuple[str, ...]
    fixed: tuple[str, ...]
    cli_overrides: tuple[str, ...]
    space: tuple[ParamSpec, ...]
    constraints: tuple[Constraint, ...]
    objectives: tuple[Objective, ...]
    sampler: Mapping[str, Any]
    pruner: Mapping[str, Any]
    trials: int | None
    workers: int
    storage: str | None
    keep_checkpoints: bool
    description: str = ""
    gpus: tuple[str, ...] = ()
    base_digest: str = field(default="", repr=False)

    @property
    def overrides(self) -> tuple[str, ...]:
        """What every trial gets on top of ``base``: the spec's fixed values, then the CLI's."""
        return self.fixed + self.cli_overrides

    @property
    def all_constraints(self) -> tuple[Constraint, ...]:
        return context_rules(config_keys()) + self.constraints

    @property
    def study_name(self) -> str:
        """The spec's name, plus a digest of the CLI overrides when there are any: the same
        command resumes the same study, a different override starts another."""
        if not self.cli_overrides:
            return self.name
        return f"{self.name}-{_digest(sorted(self.cli_overrides))[:8]}"

    @property
    def directions(self) -> list[str]:
        return [o.direction for o in self.objectives]

    @property
    def grid(self) -> bool:
        return self.sampler["type"] == "grid"

    def fingerprint(self) -> str:
        """What a resumed study must share with the one it continues (not trials/workers)."""
        return _digest(
            {
                "base": self.base_digest,
                "overrides": list(self.overrides),
                "space": [p.describe() + p.key for p in self.space],
                "constraints": [c.text for c in self.constraints],
                "objectives": [[o.metric, o.direction] for o in self.objectives],
                "sampler": self.sampler["type"],
            }
        )

    def gpu_of(self, worker: int) -> str | None:
        """The GPU worker ``worker`` is pinned to, None without ``--gpus``."""
        return self.gpus[worker % len(self.gpus)] if self.gpus else None

    def make_sampler(self, worker: int = 0) -> optuna.samplers.BaseSampler:
        """A fresh sampler; workers offset the seed so they do not draw the same points."""
        kwargs = {k: v for k, v in self.sampler.items() if k != "type"}
        if kwargs.get("seed") is not None:
            kwargs["seed"] = int(kwargs["seed"]) + worker
        return SAMPLERS[self.sampler["type"]](**kwargs)

    def make_pruner(self) -> optuna.pruners.BasePruner:
        kwargs = {k: v for k, v in self.pruner.items() if k != "type"}
        return PRUNERS[self.pruner["type"]](**kwargs)


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


@lru_cache(maxsize=1)
def config_keys() -> tuple[str, ...]:
    """Every leaf key of the config schema (``attn.l``, ``train.lr``, ...)."""
    return tuple(flatten(load_config()))


def load_spec(
    path: str | Path,
    overrides: Sequence[str] = (),
    trials: int | None = None,
    workers: int | None = None,
    storage: str | None = None,
    gpus: str | None = None,
) -> SweepSpec:
    """Read and validate ``path``; command-line values win over the spec's.

    With ``gpus`` (``"0,1,2,3"``) the sweep runs ``workers`` (default 1) workers on each
    listed GPU, and the spec's own ``workers`` field does not apply.
    """
    path = Path(path)
    devices = parse_gpus(gpus, visible_gpus()) if gpus is not None else ()
    raw = _read_yaml(path)
    _only_known_fields(raw)
    name = _name(raw.get("name", path.stem))
    base = _base_files(raw.get("base", []), path)
    spec = SweepSpec(
        name=name,
        source=path,
        experiment=_name(raw.get("experiment", name), "experiment"),
        base=base,
        fixed=_fixed(raw.get("fixed") or {}),
        cli_overrides=tuple(_cli_overrides(overrides)),
        space=_space(raw.get("space")),
        constraints=tuple(
            parse_constraint(text, config_keys()) for text in _list(raw, "constraints")
        ),
        objectives=_objectives(raw),
        sampler=_component(raw.get("sampler", {"type": "tpe"}), "sampler", SAMPLERS),
        pruner=_component(raw.get("pruner", {"type": "none"}), "pruner", PRUNERS),
        trials=_positive("trials", trials if trials is not None else raw.get("trials")),
        workers=_worker_count(raw, workers, len(devices)),
        storage=storage or raw.get("storage"),
        keep_checkpoints=bool(raw.get("keep_checkpoints", False)),
        description=str(raw.get("description", "")),
        base_digest=_digest([Path(f).read_text() for f in base]),
        gpus=devices,
    )
    _check_components(spec)
    return spec


def _worker_count(raw: Mapping[str, Any], cli_workers: int | None, n_gpus: int) -> int:
    """Workers in all: ``--workers`` or the spec's; with GPUs, ``--workers`` per GPU."""
    if n_gpus:
        return n_gpus * _positive("--workers", cli_workers if cli_workers is not None else 1)
    return _positive("workers", cli_workers if cli_workers is not None else raw.get("workers", 1))


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError("sweep spec", str(path), "no such file")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except OmegaConfBaseException as exc:
        raise ConfigError("sweep spec", str(path), f"unreadable YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError("sweep spec", str(path), "must be a YAML mapping")
    return raw


def _only_known_fields(raw: Mapping[str, Any]) -> None:
    for key in raw:
        if key not in FIELDS:
            raise ConfigError(key, raw[key], f"unknown sweep spec field; allowed: {list(FIELDS)}")
    if "objective" in raw and "objectives" in raw:
        raise ConfigError("objective", raw["objective"], "give objective or objectives, not both")


def _name(value: Any, field_name: str = "name") -> str:
    text = str(value)
    if not text or any(c in text for c in "/\\ \t\n"):
        raise ConfigError(field_name, value, "must be non-empty, without spaces or slashes")
    return text


def _list(raw: Mapping[str, Any], key: str) -> list[Any]:
    value = raw.get(key) or []
    if not isinstance(value, list):
        raise ConfigError(key, value, "must be a list")
    return value


def _base_files(value: Any, spec_path: Path) -> tuple[str, ...]:
    """Paths as given if they exist from the current directory, else from the spec's parent
    folder (``sweeps/`` sits beside ``experiments/``)."""
    files = [value] if isinstance(value, str) else value
    if not isinstance(files, list):
        raise ConfigError("base", value, "must be a YAML path or a list of them")
    resolved = []
    for entry in files:
        candidates = [Path(entry), spec_path.parent / entry, spec_path.parent.parent / entry]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            tried = ", ".join(str(c) for c in candidates)
            raise ConfigError("base", entry, f"no such file (tried {tried})")
        resolved.append(str(found.resolve()))
    return tuple(resolved)


def _check_key(where: str, key: str) -> None:
    if key not in config_keys():
        raise ConfigError(where, key, "unknown config key; see `nsa-lab config` for the keys")
    if key in RESERVED_KEYS:
        raise ConfigError(
            where, key, f"is set by the sweep for every trial ({', '.join(RESERVED_KEYS)})"
        )


def _fixed(value: Any) -> tuple[str, ...]:
    if not isinstance(value, dict):
        raise ConfigError("fixed", value, "must be a mapping of config keys to values")
    flat = flatten_keys(value, lambda raw: not isinstance(raw, dict))
    for key in flat:
        _check_key("fixed", key)
    return tuple(as_override(k, v) for k, v in flat.items())


def _cli_overrides(overrides: Sequence[str]) -> list[str]:
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep:
            raise ConfigError(item, None, "overrides are written key=value (e.g. attn.l=32)")
        _check_key("command line", key)
    return list(overrides)


def _space(value: Any) -> tuple[ParamSpec, ...]:
    if not isinstance(value, dict) or not value:
        raise ConfigError("space", value, "is empty: give at least one config key to search")
    params = []
    for key, raw in flatten_keys(value, _is_param).items():
        _check_key("space", key)
        if key.startswith("tracking."):
            raise ConfigError("space", key, "tracking.* is the same for every trial; use fixed")
        params.append(parse_param(key, raw))
    return tuple(params)


def _is_param(raw: Any) -> bool:
    """A space entry is a parameter once it is a list or has a parameter field."""
    return not isinstance(raw, dict) or bool(raw.keys() & {"choices", "low", "high", "type"})


def _objectives(raw: Mapping[str, Any]) -> tuple[Objective, ...]:
    items = raw.get("objectives", raw.get("objective", ["val/loss"]))
    items = items if isinstance(items, list) else [items]
    if not items:
        raise ConfigError("objectives", items, "needs at least one objective")
    objectives = tuple(_objective(item) for item in items)
    metrics = [o.metric for o in objectives]
    if len(set(metrics)) != len(metrics):
        raise ConfigError("objectives", metrics, "lists a metric twice")
    return objectives


def _objective(item: Any) -> Objective:
    if isinstance(item, str):
        item = {"metric": item}
    if not isinstance(item, dict) or set(item) - {"metric", "direction"} or "metric" not in item:
        raise ConfigError("objectives", item, "each is a metric name or {metric, direction}")
    metric = str(item["metric"])
    if metric not in DERIVED_OBJECTIVES and not metric.startswith(METRIC_PREFIXES):
        raise ConfigError(
            "objectives",
            metric,
            f"must be a logged metric ({', '.join(p + '...' for p in METRIC_PREFIXES)}) "
            f"or one of {list(DERIVED_OBJECTIVES)}",
        )
    default = "maximize" if metric.startswith("needle/") else "minimize"
    direction = str(item.get("direction", default))
    if direction not in ("minimize", "maximize"):
        raise ConfigError("objectives", direction, "direction must be minimize or maximize")
    return Objective(metric, direction)


def _component(value: Any, kind: str, table: Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(value, str):
        value = {"type": value}
    if not isinstance(value, dict) or value.get("type") not in table:
        raise ConfigError(f"{kind}.type", value, f"must be one of {list(table)}")
    return dict(value)


def _positive(key: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(key, value, "must be a whole number >= 1")
    return value


def _check_components(spec: SweepSpec) -> None:
    """Build the sampler and pruner once (bad settings fail here), and check the
    combinations Optuna cannot run."""
    for kind, make in (("sampler", spec.make_sampler), ("pruner", spec.make_pruner)):
        try:
            make()
        except (TypeError, ValueError) as exc:
            raise ConfigError(kind, dict(getattr(spec, kind)), str(exc)) from None
    if spec.grid:
        for p in spec.space:
            if not p.finite:
                raise ConfigError(
                    f"space.{p.key}", p.describe(), "a grid needs choices or a stepped range"
                )
        if set(spec.sampler) - {"type"}:
            raise ConfigError("sampler", dict(spec.sampler), "a grid takes no settings")
    if spec.pruner["type"] != "none":
        only = spec.objectives == (Objective(PRUNED_METRIC, "minimize"),)
        if not only:
            raise ConfigError(
                "pruner",
                spec.pruner["type"],
                f"prunes on {PRUNED_METRIC} during training, so it needs the single "
                f"objective {PRUNED_METRIC} (minimize); use pruner: none",
            )
    if spec.trials is None and not spec.grid:
        raise ConfigError("trials", None, "give trials: N in the spec or --trials N")
