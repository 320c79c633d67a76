"""What a model costs: the keys each query attends, and training FLOPs per token.

Attended tokens per query. For query position ``t`` (0-indexed, so ``t + 1`` positions
are causally visible) the count follows ``docs/nsa.md`` branch by branch, and the
result is its mean over ``t = 0 .. seq_len - 1``:

- ``full``: ``t + 1`` keys.
- compression: the visible compressed tokens, ``floor((t + 1 - l) / d) + 1`` once
  ``t >= l - 1``, else 0. They are counted whenever ``cmp`` or ``slc`` is active, since
  selection scores every visible compressed key even when the cmp output is dropped.
- selection: with at most ``n`` visible blocks of ``l_sel``, all ``t + 1`` positions;
  otherwise the query's own (partial) block, ``t mod l_sel + 1`` positions, plus
  ``n - 1`` full blocks. That is exact with forced blocks (the default); without them
  it assumes the query's own block is among the chosen, the usual case.
- window: ``min(t + 1, w)``.

Branches attend separately (each has its own keys unless ``shared_kv``), so counts add.
``topk`` is counted as the selection branch alone (its oracle scoring, dense and
without gradient, is a measuring device, not model work), ``window`` as the window alone.

Training FLOPs per token (:func:`training_flops_per_token`), the numerator of MFU, count
matrix products only, forward and backward (x 3), 2 FLOPs per multiply-add:

- ``6 x`` the weights of every ``nn.Linear`` a token goes through: projections, gates,
  MLP and the output head (tied to the embedding, counted once, as the product it is;
  the embedding lookup is no product). Biases, norms and activations are left out.
- ``phi``, the compression MLP, runs once per compressed block and kv head rather than
  per token: its weights count ``n_kv_heads * Nc / seq_len`` times, ``Nc`` being the
  blocks of a ``seq_len`` sequence.
- attention: ``2 products (QK^T, PV) x 2 x 3 x n_heads x head_dim x attended keys`` per
  layer. For ``nsa_no_cmp`` the compressed keys are only scored (no PV, no gradient),
  so its count is an upper bound by that small share.

Variants of different sparsity thus report FLOPs for the work they actually do, which
makes their MFU comparable.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch import nn

from nsa_lab.attention import get_variant
from nsa_lab.attention.base import AttentionBase
from nsa_lab.attention.nsa import BlockCompressor, NSAAttention

_SELECTION_ONLY = ("topk",)
_WINDOW_ONLY = ("window",)
_DENSE = ("full",)
# FLOPs per token for each weight of a matrix product: 2 per multiply-add, times 3 for
# the forward pass and the two products of the backward pass.
TRAIN_FLOPS_PER_WEIGHT = 6
# Per attended key, query head and head dimension: two products (QK^T and PV).
TRAIN_FLOPS_PER_KEY = 2 * TRAIN_FLOPS_PER_WEIGHT


@dataclass(frozen=True)
class AttnShape:
    """The attention settings the count depends on (a run's ``attn.*`` config)."""

    name: str
    branches: tuple[str, ...]
    l: int
    d: int
    l_sel: int
    n: int
    w: int

    @classmethod
    def from_config(cls, attn: Any) -> AttnShape:
        """From ``cfg.attn`` or any mapping/object with the same fields."""
        get = attn.get if hasattr(attn, "get") else lambda k: getattr(attn, k)
        branches = get("branches")
        if isinstance(branches, str):  # as MLflow stores it: "cmp,slc,win"
            branches = [b for b in branches.split(",") if b]
        return cls(
            name=str(get("name")),
            branches=tuple(branches),
            **{k: int(get(k)) for k in ("l", "d", "l_sel", "n", "w")},
        )


def attended_tokens_per_query(shape: AttnShape, seq_len: int) -> float:
    """Mean over query positions of the keys each query attends to (see module doc)."""
    positions = range(seq_len)
    return sum(_keys_at(shape, t) for t in positions) / seq_len


def config_attended_tokens(cfg: Any) -> float:
    """:func:`attended_tokens_per_query` of a resolved config at its ``data.seq_len``."""
    return attended_tokens_per_query(AttnShape.from_config(cfg.attn), cfg.data.seq_len)


def compressed_blocks(seq_len: int, l: int, d: int) -> int:
    """Compression blocks of length ``l`` at stride ``d`` that fit in ``seq_len`` positions."""
    return (seq_len - l) // d + 1 if seq_len >= l else 0


def _keys_at(shape: AttnShape, t: int) -> int:
    if shape.name in _DENSE:
        return t + 1
    if shape.name in _WINDOW_ONLY:
        return _window_keys(shape, t)
    if shape.name in _SELECTION_ONLY:
        return _selection_keys(shape, t)
    if get_variant(shape.name).build is not NSAAttention:
        raise ValueError(f"no attended-token count for attention variant {shape.name!r}")
    return _nsa_keys(shape, t)


def _nsa_keys(shape: AttnShape, t: int) -> int:
    branches, keys = shape.branches, 0
    if "cmp" in branches or "slc" in branches:
        keys += compressed_blocks(t + 1, shape.l, shape.d)
    if "slc" in branches:
        keys += _selection_keys(shape, t)
    if "win" in branches:
        keys += _window_keys(shape, t)
    return keys


def _selection_keys(shape: AttnShape, t: int) -> int:
    visible_blocks = t // shape.l_sel + 1
    if visible_blocks <= shape.n:
        return t + 1
    return t % shape.l_sel + 1 + (shape.n - 1) * shape.l_sel


def _window_keys(shape: AttnShape, t: int) -> int:
    return min(t + 1, shape.w)


def training_flops_per_token(model: nn.Module, attn_cfg: Any, seq_len: int) -> float:
    """Forward + backward FLOPs per trained token of ``model`` at ``seq_len`` (module doc).

    ``attn_cfg`` is the run's ``cfg.attn`` (it decides the attended keys); the layer
    shapes and weights are read off ``model`` itself, so the count follows the model.
    """
    keys = attended_tokens_per_query(AttnShape.from_config(attn_cfg), seq_len)
    attention = sum(
        TRAIN_FLOPS_PER_KEY * layer.n_heads * layer.head_dim * keys
        for layer in _attention_layers(model)
    )
    return TRAIN_FLOPS_PER_WEIGHT * matmul_weights_per_token(model, seq_len) + attention


def matmul_weights_per_token(model: nn.Module, seq_len: int) -> float:
    """Weights of the matrix products one token goes through, ``phi``'s at its share."""
    per_token = 0.0
    in_phi: set[int] = set()
    for layer in _attention_layers(model):
        for phi in (m for m in layer.modules() if isinstance(m, BlockCompressor)):
            blocks = compressed_blocks(seq_len, phi.l, phi.d)
            per_token += _linear_weights(phi) * layer.n_kv_heads * blocks / seq_len
            in_phi.update(id(m) for m in phi.modules())
    outside = (m for m in model.modules() if id(m) not in in_phi)
    return per_token + sum(m.weight.numel() for m in outside if isinstance(m, nn.Linear))


def _linear_weights(module: nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def _attention_layers(model: nn.Module) -> Iterator[AttentionBase]:
    return (m for m in model.modules() if isinstance(m, AttentionBase))
