"""Does NSA's selection find the needle? (``nsa-lab eval selection``)

A needle NSA misses beyond its window and forced blocks can only be read through the
selection branch, whose blocks the compression branch's scores choose. For each needle
cell this measures, on the same evaluation needles as ``nsa-lab eval needle``:

- ``acc``: teacher-forced exact match (every answer token the argmax, given the right
  earlier ones); equal to the greedy answer's exact match, and one forward pass.
- ``hits``: per layer with a selection branch, the share of (needle, kv group) whose
  selection at the first answer query holds every block of the needle's value digits.
- ``oracle``: ``acc`` again with those blocks put into every selection of every layer
  from the value's end on (:func:`~nsa_lab.kernels.nsa.torch_ops.preferring_blocks`).

``oracle`` well above ``acc`` says the selection scores are what fails: the model
would answer if its selection found the needle. The model runs with the PyTorch op
(the one that honours the oracle) for all three, so they are comparable.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nsa_lab.attention.nsa import NSAAttention
from nsa_lab.config import ConfigError
from nsa_lab.data.needle import VALUE_DIGITS, encode, haystack_tokens_needed, needle_position
from nsa_lab.evaluation.needle import (
    NeedleGrid,
    cell_needles,
    eval_autocast,
    eval_device,
    needle_setup,
    rows_per_batch,
)
from nsa_lab.files import write_atomic
from nsa_lab.kernels.nsa.torch_ops import nsa_attention, preferring_blocks


@dataclass(frozen=True)
class SelectionCell:
    """One (length, depth) cell of the selection diagnosis."""

    length: int
    depth: float
    trials: int
    blocks: tuple[int, ...]  # selection blocks holding the needle's value digits
    correct: int  # teacher-forced exact matches, the model as trained
    oracle_correct: int  # the same with ``blocks`` in every selection
    hits: tuple[float, ...]  # per selecting layer, in [0, 1]


def selecting_layers(model: nn.Module) -> list[NSAAttention]:
    """The model's NSA layers that have a selection branch, in depth order."""
    return [
        block.attn
        for block in model.blocks
        if isinstance(block.attn, NSAAttention) and "slc" in block.attn.params.branches
    ]


def value_span(length: int, depth: float, value_offset: int) -> range:
    """Token positions of a cell's value digits (the needle starts at ``depth``)."""
    start = needle_position(depth, haystack_tokens_needed(length)) + value_offset
    return range(start, start + VALUE_DIGITS)


def blocks_of(span: range, l_sel: int) -> tuple[int, ...]:
    """Selection blocks of ``l_sel`` tokens that hold the positions of ``span``."""
    return tuple(range(span.start // l_sel, (span.stop - 1) // l_sel + 1))


@contextlib.contextmanager
def reference_op(layers: Sequence[NSAAttention]) -> Iterator[None]:
    """Run ``layers`` with the PyTorch NSA op (the Triton kernels ignore the oracle)."""
    saved = [layer.nsa_op for layer in layers]
    for layer in layers:
        layer.nsa_op = nsa_attention
    try:
        yield
    finally:
        for layer, op in zip(layers, saved, strict=True):
            layer.nsa_op = op


@contextlib.contextmanager
def layer_inputs(layers: Sequence[NSAAttention]) -> Iterator[list[tuple[torch.Tensor, ...]]]:
    """Collects each layer's ``(x, cos, sin)`` during the forward passes inside."""
    seen: list[tuple[torch.Tensor, ...]] = []
    handles = [
        layer.register_forward_pre_hook(lambda _, args: seen.append(args[:3])) for layer in layers
    ]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def teacher_forced_correct(model: nn.Module, tokens: torch.Tensor, prompt_len: int) -> np.ndarray:
    """Per row of ``tokens`` (prompt + answer): is every answer token the argmax?

    Only the positions that predict the answer get logits (``last_positions``).
    """
    answer = tokens[:, prompt_len:]
    predicted = model(tokens[:, :-1], last_positions=answer.shape[1]).argmax(dim=-1)
    return (predicted == answer).all(dim=-1).cpu().numpy()


@torch.no_grad()
def diagnose_cell(
    model: nn.Module,
    layers: Sequence[NSAAttention],
    haystack: np.ndarray,
    length: int,
    depth: float,
    grid: NeedleGrid,
    device: torch.device,
) -> SelectionCell:
    """Accuracy, oracle accuracy and per-layer hit rates for one cell of ``grid``.

    The trials run in batches of :func:`rows_per_batch`, as in the needle evaluation.
    """
    prompts, facts = cell_needles(haystack, length, depth, grid.trials, grid.seed)
    answers = np.stack([encode(fact.answer) for fact in facts])
    tokens = torch.from_numpy(np.concatenate([prompts, answers], axis=1))
    prompt_len = prompts.shape[1]
    span = value_span(length, depth, facts[0].value_offset)  # keys, hence offsets, have one length
    blocks = blocks_of(span, layers[0].params.l_sel)
    correct, oracle, holds = [], [], []
    for chunk in torch.split(tokens, rows_per_batch(length)):
        chunk = chunk.to(device)
        with eval_autocast(device), layer_inputs(layers) as seen:
            correct.append(teacher_forced_correct(model, chunk, prompt_len))
            holds.append(
                [
                    _holding(layer.selection_indices(*args)[:, prompt_len - 1], blocks)
                    for layer, args in zip(layers, seen, strict=True)
                ]
            )
        with eval_autocast(device), preferring_blocks(blocks, span.stop):
            oracle.append(teacher_forced_correct(model, chunk, prompt_len))
    hits = tuple(
        torch.cat(per_layer).float().mean().item() for per_layer in zip(*holds, strict=True)
    )
    return SelectionCell(
        length,
        depth,
        grid.trials,
        blocks,
        int(np.concatenate(correct).sum()),
        int(np.concatenate(oracle).sum()),
        hits,
    )


def _holding(indices: torch.Tensor, blocks: Sequence[int]) -> torch.Tensor:
    """Bool ``[B,G]``: does the selection ``indices [B,G,n]`` hold every one of ``blocks``?"""
    return torch.stack([(indices == b).any(dim=-1) for b in blocks]).all(dim=0)


def mean_tile_union(indices: torch.Tensor, positions: int) -> float:
    """Mean count of distinct blocks that ``positions`` consecutive query positions chose
    together, over every (batch, tile, kv group) of ``indices [B,T,G,n]`` (-1: none).

    The Triton selection kernels' forward and dQ walk such a union per tile of
    ``triton_selection._positions_per_tile`` positions (enough, with the group's heads, to
    fill the 16 rows of a tensor-core product), each row attending only its own
    position's blocks: the union over what one position reads is the kernels' overhead.
    """
    b, t_len, n_groups, n = indices.shape
    tiles = -(-t_len // positions)
    padded = indices.new_full((b, tiles * positions, n_groups, n), -1)
    padded[:, :t_len] = indices
    by_tile = padded.view(b, tiles, positions, n_groups, n).transpose(2, 3)
    ordered = by_tile.reshape(b, tiles, n_groups, positions * n).sort(dim=-1).values
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[..., 1:] = ordered[..., 1:] != ordered[..., :-1]
    return (first & (ordered >= 0)).sum(dim=-1).float().mean().item()


@dataclass(frozen=True)
class LayerSharing:
    """How much one layer's neighbouring query positions share their selections."""

    layer: int
    blocks: float  # blocks a position reads, on average
    unions: dict[int, float]  # tile size -> mean union of its positions' blocks


@torch.no_grad()
def selection_sharing(
    model: nn.Module, tokens: torch.Tensor, tile_sizes: Sequence[int]
) -> list[LayerSharing]:
    """Per selecting layer of ``model``: blocks per position and tile unions on ``tokens``.

    Neighbours that choose alike make small unions, hence fast selection kernels; an
    untrained model's choices beyond the forced blocks are nearly independent.
    """
    layers = selecting_layers(model)
    with layer_inputs(layers) as seen:
        model(tokens)
    result = []
    for i, (layer, args) in enumerate(zip(layers, seen, strict=True)):
        indices = layer.selection_indices(*args)
        result.append(
            LayerSharing(
                i,
                (indices >= 0).sum(dim=-1).float().mean().item(),
                {size: mean_tile_union(indices, size) for size in tile_sizes},
            )
        )
    return result


def diagnose_run(
    ref: str,
    lengths: Sequence[int] | None = None,
    depths: Sequence[float] | None = None,
    trials: int | None = None,
    seed: int = 0,
    tracking_uri: str | None = None,
    device: str = "auto",
) -> list[SelectionCell]:
    """The selection diagnosis of run or checkpoint ``ref`` over its needle grid."""
    torch_device = eval_device(device)
    loaded, grid, haystack = needle_setup(ref, lengths, depths, trials, seed, tracking_uri)
    model = loaded.module.model.to(torch_device).eval()
    layers = selecting_layers(model)
    if not layers:
        raise ConfigError(
            "RUN", ref, f"variant {loaded.cfg.attn.name!r} has no NSA selection branch to inspect"
        )
    with reference_op(layers):
        return [
            diagnose_cell(model, layers, haystack, length, depth, grid, torch_device)
            for length in grid.lengths
            for depth in grid.depths
        ]


def selection_table(cells: Sequence[SelectionCell], title: str = "") -> str:
    """Markdown: one row per cell (accuracy, oracle accuracy, hits per layer), then totals."""
    n_layers = len(cells[0].hits)
    head = ["length", "depth", "value blocks", "acc %", "oracle acc %"]
    head += [f"hit % L{i}" for i in range(n_layers)]
    lines = [f"**{title}**\n" if title else "", "| " + " | ".join(head) + " |"]
    lines.append("|---" * len(head) + "|")
    for c in cells:
        row = [str(c.length), f"{c.depth:g}", ",".join(map(str, c.blocks))]
        row += [f"{100 * c.correct / c.trials:.0f}", f"{100 * c.oracle_correct / c.trials:.0f}"]
        row += [f"{100 * h:.0f}" for h in c.hits]
        lines.append("| " + " | ".join(row) + " |")
    total = sum(c.trials for c in cells)
    acc = 100 * sum(c.correct for c in cells) / total
    oracle = 100 * sum(c.oracle_correct for c in cells) / total
    lines.append(
        f"\nOverall {acc:.1f}% teacher-forced, {oracle:.1f}% with the needle's blocks selected "
        f"({total} needles). Hit: the selection at the first answer query holds every value "
        "block, per layer with a selection branch (L0 = first)."
    )
    return "\n".join(line for line in lines if line) + "\n"


def write_selection_table(table: str, out_dir: str | Path) -> Path:
    """``needle_selection.md`` in ``out_dir``, written whole or not at all."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "needle_selection.md"
    write_atomic(path, lambda p: p.write_text(table))
    return path
