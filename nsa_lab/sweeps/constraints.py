"""Constraints on a trial's configuration, checked before anything is trained.

Three layers, each reused rather than restated:

1. :func:`nsa_lab.config.load_config` (the config's own rules: ``d | l``, ``d | l_sel``,
   ``l <= l_sel``, ``n >= 3`` with forced blocks, types, registered variants, ...);
2. the sweep's built-in context rules (:data:`CONTEXT_RULES`): a sliding window and the
   selected blocks must fit the trained context, or the sparse branch is dense in
   disguise and the trial measures nothing new;
3. the spec's own ``constraints``: expressions such as ``attn.n * attn.l_sel <= 256``.

Expressions are a small, safe subset of Python parsed with :mod:`ast` and evaluated by
walking the tree (never ``eval``): config keys written as dotted names, numbers,
strings, ``True/False/None``, lists/tuples of those, arithmetic ``+ - * / // %``,
comparisons (chained too, ``in``/``not in``), ``and/or/not``, unary minus, and the
functions ``len``, ``min``, ``max``, ``abs``.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from nsa_lab.config import ConfigError, load_config

_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}
_COMPARE: dict[type, Callable[[Any, Any], bool]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
}
_FUNCTIONS: dict[str, Callable[..., Any]] = {"len": len, "min": min, "max": max, "abs": abs}
_CONSTANTS = (int, float, str, bool, type(None))


@dataclass(frozen=True)
class Constraint:
    """A parsed constraint: its source text, the config keys it reads, and why it exists."""

    text: str
    tree: ast.Expression
    keys: tuple[str, ...]
    why: str = ""

    def holds(self, cfg: DictConfig) -> bool:
        return bool(_evaluate(self.tree.body, cfg))

    def describe(self, cfg: DictConfig) -> str:
        """``attn.w=1024, data.seq_len=512``: the values the expression saw."""
        return ", ".join(f"{k}={_config_value(cfg, k)!r}" for k in self.keys)


def parse_constraint(text: str, known_keys: Iterable[str], why: str = "") -> Constraint:
    """Parse ``text``; reject syntax outside the safe subset and keys the config lacks."""
    where = "constraints"
    try:
        tree = ast.parse(str(text).strip(), mode="eval")
    except SyntaxError as exc:
        raise ConfigError(where, text, f"not a valid expression ({exc.msg})") from None
    keys: list[str] = []
    _check_node(tree.body, text, keys)
    known = set(known_keys)
    for key in keys:
        if key not in known:
            raise ConfigError(where, text, f"unknown config key {key!r}")
    return Constraint(str(text), tree, tuple(dict.fromkeys(keys)), why)


def _check_node(node: ast.AST, text: str, keys: list[str]) -> None:
    """Accept only the documented subset; collect the dotted config keys it names."""
    if isinstance(node, (ast.Name, ast.Attribute)):
        keys.append(_dotted_name(node, text))
        return
    if isinstance(node, ast.Constant) and isinstance(node.value, _CONSTANTS):
        return
    if isinstance(node, ast.Call):
        name = node.func.id if isinstance(node.func, ast.Name) else None
        if name not in _FUNCTIONS or node.keywords:
            raise ConfigError("constraints", text, f"only {sorted(_FUNCTIONS)} may be called")
        children: list[ast.AST] = list(node.args)
    elif isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        children = [node.left, node.right]
    elif isinstance(node, ast.Compare) and all(type(op) in _COMPARE for op in node.ops):
        children = [node.left, *node.comparators]
    elif isinstance(node, ast.BoolOp):
        children = list(node.values)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub, ast.UAdd)):
        children = [node.operand]
    elif isinstance(node, (ast.List, ast.Tuple)):
        children = list(node.elts)
    else:
        raise ConfigError(
            "constraints",
            text,
            f"{type(node).__name__} is not allowed; use config keys, numbers, strings, "
            "arithmetic, comparisons, and/or/not and len/min/max/abs",
        )
    for child in children:
        _check_node(child, text, keys)


def _dotted_name(node: ast.AST, text: str) -> str:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        raise ConfigError("constraints", text, "attribute access is only for config keys")
    parts.append(node.id)
    return ".".join(reversed(parts))


def _evaluate(node: ast.AST, cfg: DictConfig) -> Any:
    if isinstance(node, (ast.Name, ast.Attribute)):
        return _config_value(cfg, _dotted_name(node, ""))
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Call):
        return _FUNCTIONS[node.func.id](*(_evaluate(a, cfg) for a in node.args))
    if isinstance(node, ast.BinOp):
        return _BINARY[type(node.op)](_evaluate(node.left, cfg), _evaluate(node.right, cfg))
    if isinstance(node, ast.Compare):
        left = _evaluate(node.left, cfg)
        for op, right_node in zip(node.ops, node.comparators, strict=True):
            right = _evaluate(right_node, cfg)
            if not _COMPARE[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.BoolOp):
        values = (_evaluate(v, cfg) for v in node.values)
        return all(values) if isinstance(node.op, ast.And) else any(values)
    if isinstance(node, ast.UnaryOp):
        value = _evaluate(node.operand, cfg)
        if isinstance(node.op, ast.Not):
            return not value
        return -value if isinstance(node.op, ast.USub) else +value
    return [_evaluate(e, cfg) for e in node.elts]  # List / Tuple (checked at parse time)


def _config_value(cfg: DictConfig, key: str) -> Any:
    value = OmegaConf.select(cfg, key)
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value)
    return value


# The built-in rules of every sweep: (expression, why). The config itself checks the
# block arithmetic; these add what only matters once a context length is fixed.
CONTEXT_RULES: tuple[tuple[str, str], ...] = (
    ("attn.w <= data.seq_len", "the sliding window must fit the context"),
    ("attn.n * attn.l_sel <= data.seq_len", "the n selected blocks must fit the context"),
)


def context_rules(known_keys: Iterable[str]) -> tuple[Constraint, ...]:
    keys = list(known_keys)
    return tuple(parse_constraint(text, keys, why) for text, why in CONTEXT_RULES)


def checked_config(
    files: Sequence[str], overrides: Sequence[str], constraints: Sequence[Constraint]
) -> DictConfig:
    """The trial's validated config, or ConfigError naming the first rule it breaks."""
    cfg = load_config(files, overrides)
    for constraint in constraints:
        if not constraint.holds(cfg):
            why = f" ({constraint.why})" if constraint.why else ""
            raise ConfigError(
                "constraint",
                constraint.text,
                f"does not hold for {constraint.describe(cfg)}{why}",
            )
    return cfg
