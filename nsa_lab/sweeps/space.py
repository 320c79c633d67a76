"""Search spaces: one :class:`ParamSpec` per config key, as Optuna distributions.

A spec writes a parameter in one of three ways::

    attn.l: [16, 32, 64]                               # categorical (shorthand)
    attn.n: {low: 4, high: 16, step: 4}                # int range (ints in, ints out)
    train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}   # float range, log scale

(``type: categorical|int|float`` may be written explicitly; ``choices:`` is the long
form of the list). A categorical string is passed to the config as written, so
``"[cmp,win]"`` reaches ``attn.branches`` as a list.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import optuna

from nsa_lab.config import ConfigError

KINDS = ("categorical", "int", "float")
_RANGE_FIELDS = {"type", "low", "high", "step", "log"}
_CHOICE_FIELDS = {"type", "choices"}
Scalar = str | int | float | bool | None


@dataclass(frozen=True)
class ParamSpec:
    """One searched config key."""

    key: str
    kind: str
    choices: tuple[Scalar, ...] = ()
    low: float = 0
    high: float = 0
    step: float | None = None
    log: bool = False

    @property
    def finite(self) -> bool:
        return self.kind != "float" or self.step is not None

    def values(self) -> list[Scalar]:
        """Every value of a finite parameter (the grid axis)."""
        if self.kind == "categorical":
            return list(self.choices)
        if not self.finite:
            raise ConfigError(
                f"space.{self.key}", self.describe(), "a grid needs choices or a stepped range"
            )
        step = self.step or 1
        count = int(round((self.high - self.low) / step)) + 1
        return [type(self.low)(self.low + i * step) for i in range(count)]

    def describe(self) -> str:
        if self.kind == "categorical":
            return f"categorical{list(self.choices)}"
        scale = ", log" if self.log else ""
        step = f", step {self.step}" if self.step is not None else ""
        return f"{self.kind}[{self.low}, {self.high}{step}{scale}]"


def parse_param(key: str, raw: Any) -> ParamSpec:
    """A ParamSpec from the spec's YAML value, with a clear error for every malformed form."""
    where = f"space.{key}"
    if isinstance(raw, (list, tuple)):
        raw = {"choices": list(raw)}
    if not isinstance(raw, Mapping):
        raise ConfigError(where, raw, "must be a list of choices or a {low, high} range")
    kind = raw.get("type") or ("categorical" if "choices" in raw else _range_kind(raw))
    if kind not in KINDS:
        raise ConfigError(where, kind, f"type must be one of {list(KINDS)}")
    if kind == "categorical":
        return _categorical(key, raw)
    return _range(key, kind, raw)


def _range_kind(raw: Mapping[str, Any]) -> str:
    bounds = [raw.get(f) for f in ("low", "high", "step")]
    return "float" if any(isinstance(b, float) for b in bounds) else "int"


def _categorical(key: str, raw: Mapping[str, Any]) -> ParamSpec:
    where = f"space.{key}"
    _only(where, raw, _CHOICE_FIELDS)
    choices = raw.get("choices")
    if not isinstance(choices, (list, tuple)) or not choices:
        raise ConfigError(where, choices, "needs a non-empty list of choices")
    for choice in choices:
        if not isinstance(choice, Scalar):
            raise ConfigError(
                where, choice, 'choices are scalars; write a list as a string, e.g. "[cmp,win]"'
            )
    if len(set(map(json.dumps, choices))) != len(choices):
        raise ConfigError(where, list(choices), "lists a choice twice")
    return ParamSpec(key, "categorical", choices=tuple(choices))


def _range(key: str, kind: str, raw: Mapping[str, Any]) -> ParamSpec:
    where = f"space.{key}"
    _only(where, raw, _RANGE_FIELDS)
    if "low" not in raw or "high" not in raw:
        raise ConfigError(where, dict(raw), f"an {kind} range needs low and high")
    cast = int if kind == "int" else float
    numbers = {f: raw[f] for f in ("low", "high", "step") if raw.get(f) is not None}
    for field, value in numbers.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}.{field}", value, "must be a number")
        if kind == "int" and value != int(value):
            raise ConfigError(f"{where}.{field}", value, "must be a whole number for an int range")
    low, high = cast(raw["low"]), cast(raw["high"])
    step = cast(numbers["step"]) if "step" in numbers else None
    log = bool(raw.get("log", False))
    if low > high:
        raise ConfigError(where, dict(raw), "low must be <= high (an empty range)")
    if log and (low <= 0 or (step is not None and step != 1)):
        raise ConfigError(where, dict(raw), "a log range needs low > 0 and no step")
    if step is not None and step <= 0:
        raise ConfigError(f"{where}.step", step, "must be > 0")
    return ParamSpec(key, kind, low=low, high=high, step=step, log=log)


def _only(where: str, raw: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(where, unknown, f"unknown field(s); allowed: {sorted(allowed)}")


def suggest(trial: optuna.Trial, space: Sequence[ParamSpec]) -> dict[str, Scalar]:
    """Ask the trial for every parameter (an enqueued trial returns its fixed values)."""
    return {p.key: _suggest_one(trial, p) for p in space}


def _suggest_one(trial: optuna.Trial, p: ParamSpec) -> Scalar:
    if p.kind == "categorical":
        return trial.suggest_categorical(p.key, list(p.choices))
    if p.kind == "int":
        step = int(p.step or 1)
        return trial.suggest_int(p.key, int(p.low), int(p.high), step=step, log=p.log)
    return trial.suggest_float(p.key, p.low, p.high, step=p.step, log=p.log)


def grid(space: Sequence[ParamSpec]) -> Iterator[dict[str, Scalar]]:
    """Every combination, in the order the spec lists keys and values."""
    keys = [p.key for p in space]
    for combo in itertools.product(*(p.values() for p in space)):
        yield dict(zip(keys, combo, strict=True))


def grid_size(space: Sequence[ParamSpec]) -> int:
    size = 1
    for p in space:
        size *= len(p.values())
    return size


def as_override(key: str, value: Any) -> str:
    """``key=value`` in OmegaConf's dotlist syntax: strings as written, the rest as JSON."""
    text = value if isinstance(value, str) else json.dumps(value)
    return f"{key}={text}"
