"""Attended tokens per query: the closed form against counts read off the reference masks."""

from __future__ import annotations

import pytest
import torch

from nsa_lab.config import load_config
from nsa_lab.kernels.nsa.naive import (
    reference_cmp_probs,
    reference_select_blocks,
    reference_selection_attention,
    reference_window_attention,
)
from nsa_lab.models.flops import AttnShape, attended_tokens_per_query, config_attended_tokens
from tests.conftest import SMOKE

VARIANTS = ["full", "window", "topk", "nsa", "nsa_no_cmp", "nsa_no_slc", "nsa_no_win"]
VARIANTS += ["nsa_shared_kv"]
GROUPS = 2


def attended_positions(out: torch.Tensor) -> torch.Tensor:
    """Keys per query from a uniform-attention output over one-hot values: ``[T]``."""
    return (out[0, :, 0] > 0).sum(-1)


def brute_force_counts(shape: AttnShape, t_len: int) -> torch.Tensor:
    """Per-position key counts, read from the reference implementation's masks: queries of
    zeros attend uniformly, so with one-hot values an output entry is > 0 exactly where
    the mask admits that key."""
    gen = torch.Generator().manual_seed(0)
    q0 = torch.zeros(1, t_len, 2 * GROUPS, t_len, dtype=torch.float64)
    keys = torch.randn(1, t_len, GROUPS, t_len, generator=gen, dtype=torch.float64)
    one_hot = torch.eye(t_len, dtype=torch.float64)[None, :, None, :].expand(1, t_len, GROUPS, -1)
    counts = {"full": torch.arange(1, t_len + 1)}
    n_cmp = max(0, (t_len - shape.l) // shape.d + 1)
    q = torch.randn(1, t_len, 2 * GROUPS, 8, generator=gen, dtype=torch.float64)
    kc = torch.randn(1, n_cmp, GROUPS, 8, generator=gen, dtype=torch.float64)
    counts["cmp"] = (reference_cmp_probs(q, kc, shape.l, shape.d)[0, :, 0] > 0).sum(-1)
    n_sel = -(-t_len // shape.l_sel)
    scores = torch.rand(1, t_len, GROUPS, n_sel, generator=gen, dtype=torch.float64)
    chosen = reference_select_blocks(scores, shape.n, shape.l_sel, force_init_local=True)
    slc = reference_selection_attention(q0, keys, one_hot, chosen, shape.l_sel)
    counts["slc"] = attended_positions(slc)
    counts["win"] = attended_positions(reference_window_attention(q0, keys, one_hot, shape.w))
    if shape.name in ("full", "window", "topk"):
        return counts[{"full": "full", "window": "win", "topk": "slc"}[shape.name]]
    scored = "cmp" in shape.branches or "slc" in shape.branches  # selection reads cmp keys
    total = counts["cmp"] * scored
    for branch in ("slc", "win"):
        total = total + counts[branch] * (branch in shape.branches)
    return total


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(
    "blocks",
    [
        {"l": 8, "d": 4, "l_sel": 16, "n": 3, "w": 16, "seq_len": 64},
        {"l": 16, "d": 8, "l_sel": 16, "n": 4, "w": 24, "seq_len": 61},
        {"l": 4, "d": 4, "l_sel": 4, "n": 5, "w": 7, "seq_len": 33},
        {"l": 8, "d": 8, "l_sel": 8, "n": 16, "w": 64, "seq_len": 40},  # n covers everything
    ],
)
def test_attended_tokens_match_reference_masks(variant, blocks):
    blocks = dict(blocks)  # the parameter dict is shared by every variant
    seq_len = blocks.pop("seq_len")
    overrides = [f"attn.name={variant}", *(f"attn.{k}={v}" for k, v in blocks.items())]
    cfg = load_config([SMOKE], [*overrides, f"data.seq_len={seq_len}"])
    shape = AttnShape.from_config(cfg.attn)
    expected = brute_force_counts(shape, seq_len).double().mean().item()
    assert attended_tokens_per_query(shape, seq_len) == pytest.approx(expected, abs=1e-9)
    assert config_attended_tokens(cfg) == pytest.approx(expected, abs=1e-9)


def test_shape_from_logged_params_matches_config():
    cfg = load_config([SMOKE], ["attn.name=nsa_no_win"])
    params = {"name": "nsa_no_win", "branches": "cmp,slc", "l": "8", "d": "4"}
    params |= {"l_sel": "16", "n": "3", "w": "16"}
    assert AttnShape.from_config(params) == AttnShape.from_config(cfg.attn)


def test_sparsity_ordering_at_default_context():
    """Sanity of the numbers a sweep optimises: dropping a branch never adds keys, and
    every sparse variant attends fewer keys than dense attention at 512 tokens."""
    base = ["data.seq_len=512", "model.max_seq_len=512"]

    def cost(name: str) -> float:
        return config_attended_tokens(load_config([SMOKE], [*base, f"attn.name={name}"]))

    assert cost("full") == pytest.approx(256.5)
    for ablated in ("nsa_no_cmp", "nsa_no_slc", "nsa_no_win"):
        assert cost(ablated) <= cost("nsa") < cost("full")
    assert cost("nsa_shared_kv") == cost("nsa")
