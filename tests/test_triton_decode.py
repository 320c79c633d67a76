"""The Triton NSA decoding step against ``torch_decode``, the PyTorch step it replaces.

The block choice on its own (the scoring kernel's top-n against
``selected_blocks_decode``), then the whole step at positions that cross the
compression (l=8, stride 4), selection and window (w=12) boundaries, for every branch
subset. Caches are built consistently: raw keys for positions ``0..t`` (NaN after ``t``,
which no branch may read), the compressed blocks completed by ``t``, and the window's
keys in ring-buffer order. Shapes are tiny: without a GPU every program runs in Triton's
CPU interpreter, where splits are small enough for these shapes to cross them. Outputs
the kernels allocate are poisoned, so an element no kernel writes fails the comparison.
"""

from __future__ import annotations

import itertools
import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from nsa_lab.kernels.nsa import torch_decode  # noqa: E402
from nsa_lab.kernels.nsa.spec import BRANCHES, NSAParams  # noqa: E402
from nsa_lab.kernels.nsa.triton_decode import (  # noqa: E402
    MIN_SPLIT_KEYS,
    _splits,
    nsa_decode_step_triton,
    selected_blocks_triton,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-5 if DEVICE == "cpu" else 1e-4  # fp32 dots are exact (ieee); GPU exp2 is approximate
L, D, W = 8, 4, 12  # compression block length, stride; window


@pytest.fixture
def poisoned(monkeypatch: pytest.MonkeyPatch) -> None:
    """``torch.empty`` hands out NaN (float) or 77 (int) memory."""
    empty = torch.empty

    def poison(x: torch.Tensor) -> torch.Tensor:
        return x.fill_(math.nan if x.is_floating_point() else 77)

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison(empty(*a, **kw)))


def randn(*shape: int, pad_last: int = 0) -> torch.Tensor:
    """A random tensor viewed out of a wider one: kernels must honour strides."""
    return torch.randn(*shape[:-1], shape[-1] + pad_last, device=DEVICE)[..., : shape[-1]]


def close(actual: torch.Tensor, expected: torch.Tensor, tol: float = TOL) -> None:
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


def step_inputs(
    b: int, g: int, hpg: int, dk: int, dv: int, t: int, params: NSAParams
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """``q``, gates and the caches a step at ``t`` reads, for the active branches only."""
    h = g * hpg
    q, gates = randn(b, h, dk, pad_last=3), torch.rand(b, h, len(params.branches), device=DEVICE)
    s = t + 4  # the selection cache reaches past t; those positions must not be read
    k, v = randn(b, s, g, dk), randn(b, s, g, dv, pad_last=1)
    k[:, t + 1 :], v[:, t + 1 :] = math.nan, math.nan
    n_cmp = torch_decode.compressed_blocks_done(t, params.l, params.d)
    window = torch.arange(max(0, t - params.w + 1), t + 1, device=DEVICE)
    ring = window[torch.randperm(len(window), device=DEVICE)]  # the window in any order
    caches: dict[str, torch.Tensor] = {}
    if params.scores_selection:
        caches["kc"] = randn(b, n_cmp, g, dk)
    if "cmp" in params.branches:
        caches["vc"] = randn(b, n_cmp, g, dv)
    if "slc" in params.branches:
        caches["k_slc"], caches["v_slc"] = k, v
    if "win" in params.branches:
        caches["k_win"], caches["v_win"] = k[:, ring], v[:, ring]
    return q, gates, caches


@pytest.mark.parametrize("programs", [1, 6, 300])
def test_splits_cover_every_item_and_none_is_empty(programs):
    for n_items in range(1, 300):
        for least in (1, 4, MIN_SPLIT_KEYS):
            per_split, splits = _splits(n_items, programs, least)
            assert (splits - 1) * per_split < n_items <= splits * per_split
    assert _splits(0, programs, 4) == (0, 0)


# (batch, groups, heads per group, Dk, l_sel, n, t, force_init_local)
SELECTION_CASES = [
    (2, 2, 4, 16, 8, 3, 5, True),  # no compressed block yet: only forced blocks score
    (1, 1, 1, 8, 8, 6, 21, True),  # more slots than visible blocks: -1 padded
    (3, 2, 4, 24, 16, 4, 70, False),
    (1, 2, 16, 64, 8, 5, 137, True),  # 33 compressed blocks: score tiles and cmp splits
    (2, 1, 3, 16, 4, 7, 90, True),  # l_sel < l: a compressed block spans three blocks
]


@pytest.mark.parametrize(
    ("b", "g", "hpg", "dk", "l_sel", "n", "t", "force"),
    SELECTION_CASES,
    ids=[f"b{c[0]}g{c[1]}hpg{c[2]}lsel{c[4]}n{c[5]}t{c[6]}" for c in SELECTION_CASES],
)
def test_selected_blocks_match_torch(poisoned, b, g, hpg, dk, l_sel, n, t, force):
    """The scoring kernel picks the blocks ``selected_blocks_decode`` picks, in its order."""
    torch.manual_seed(t + n)
    params = NSAParams(l=L, d=D, l_sel=l_sel, n=n, w=W, force_init_local=force)
    q = randn(b, g * hpg, dk, pad_last=2)
    kc = randn(b, torch_decode.compressed_blocks_done(t, L, D), g, dk)
    indices = selected_blocks_triton(q, kc, params, t, scale=0.4)
    expected = torch_decode.selected_blocks_decode(q, kc, None, params, t, 0.4)
    assert indices.dtype == torch.int32
    assert torch.equal(indices.long(), expected)


def test_back_to_back_steps_each_rank_their_own_candidates(poisoned):
    """The scoring kernel's finished-chunk counters outlive a step (one buffer per device,
    reset by each group's last chunk): a second step, with other shapes and values, must
    find them at zero, or no chunk would know it is the last and no block would be chosen."""
    for t, b, g in ((70, 2, 2), (45, 3, 1), (70, 2, 2)):
        torch.manual_seed(t + b)
        params = NSAParams(l=L, d=D, l_sel=8, n=5, w=W)
        q, kc = randn(b, g * 4, 16), randn(b, torch_decode.compressed_blocks_done(t, L, D), g, 16)
        expected = torch_decode.selected_blocks_decode(q, kc, None, params, t, 0.25)
        assert torch.equal(selected_blocks_triton(q, kc, params, t, 0.25).long(), expected)


# (batch, groups, heads per group, Dk, Dv, l_sel, n, t, force_init_local)
STEP_CASES = [
    (1, 1, 1, 16, 16, 8, 4, 3, True),  # t < l-1: no compressed block; 1 of 4 slots used
    (2, 2, 4, 16, 16, 8, 4, 7, True),  # the first compressed block just completed
    (3, 2, 4, 24, 8, 8, 3, 13, True),  # the query's selection block is partial
    (1, 2, 16, 64, 64, 16, 4, 29, True),  # t >= w; more slots than visible blocks
    (3, 1, 4, 8, 24, 8, 4, 70, False),
    (3, 2, 1, 16, 32, 8, 8, 63, True),  # t ends a selection block
    (1, 2, 4, 128, 64, 16, 5, 137, True),  # 33 compressed blocks: cmp splits
]


@pytest.mark.parametrize(
    ("b", "g", "hpg", "dk", "dv", "l_sel", "n", "t", "force"),
    STEP_CASES,
    ids=[f"b{c[0]}g{c[1]}hpg{c[2]}dk{c[3]}dv{c[4]}t{c[7]}" for c in STEP_CASES],
)
def test_decode_step_matches_torch(poisoned, b, g, hpg, dk, dv, l_sel, n, t, force):
    torch.manual_seed(t * 7 + hpg)
    params = NSAParams(l=L, d=D, l_sel=l_sel, n=n, w=W, force_init_local=force)
    q, gates, caches = step_inputs(b, g, hpg, dk, dv, t, params)
    out = nsa_decode_step_triton(q, gates, params, t, **caches)
    assert out.shape == (b, g * hpg, dv) and out.dtype == q.dtype
    close(out, torch_decode.nsa_decode_step(q, gates, params, t, **caches))


SUBSETS = [s for r in (1, 2, 3) for s in itertools.combinations(BRANCHES, r)]


@pytest.mark.parametrize("branches", SUBSETS, ids=["+".join(s) for s in SUBSETS])
@pytest.mark.parametrize("t", [5, 45])
def test_every_branch_subset_matches_torch(poisoned, branches, t):
    torch.manual_seed(t)
    params = NSAParams(l=L, d=D, l_sel=8, n=3, w=W, branches=branches)
    q, gates, caches = step_inputs(2, 2, 2, 16, 24, t, params)
    out = nsa_decode_step_triton(q, gates, params, t, **caches)
    close(out, torch_decode.nsa_decode_step(q, gates, params, t, **caches))


def test_refuses_to_run_where_a_gradient_is_expected():
    params = NSAParams(l=L, d=D, l_sel=8, n=2, w=W, branches=("win",))
    q, gates, caches = step_inputs(1, 1, 2, 16, 16, 9, params)
    with pytest.raises(RuntimeError, match="inference only"):
        nsa_decode_step_triton(q.requires_grad_(), gates, params, 9, **caches)
    with pytest.raises(RuntimeError, match="inference only"):
        selected_blocks_triton(q, caches["k_win"], params, 9)
    with torch.no_grad():
        assert not nsa_decode_step_triton(q, gates, params, 9, **caches).requires_grad


@pytest.mark.skipif(DEVICE != "cuda", reason="bf16 tl.dot needs a GPU")
@pytest.mark.parametrize("t", [300, 5000])
def test_bf16_step_on_gpu_matches_float32_torch(t):
    """bf16 inputs against the float32 reference on the same (rounded) values. ``n``
    covers every visible block, so bf16 scoring cannot change which blocks attend."""
    torch.manual_seed(t)
    l_sel = 64
    params = NSAParams(l=32, d=16, l_sel=l_sel, n=t // l_sel + 1, w=128)
    q, gates, caches = step_inputs(2, 2, 16, 128, 128, t, params)
    q, gates = q.bfloat16(), gates.bfloat16()
    caches = {name: x.bfloat16() for name, x in caches.items()}
    out = nsa_decode_step_triton(q, gates, params, t, **caches)
    assert out.dtype == torch.bfloat16
    ref = torch_decode.nsa_decode_step(
        q.float(), gates.float(), params, t, **{n: x.float() for n, x in caches.items()}
    )
    close(out.float(), ref, tol=2e-2)


def test_nsa_layer_decodes_through_the_kernels_as_its_full_forward():
    """``attn.impl=triton``: prefill (training kernels) + one-token steps (decode kernels)
    give the logits of one full forward, as the PyTorch path does in test_decoding."""
    from nsa_lab.config import load_config
    from nsa_lab.models import GQATransformer
    from tests.test_decoding import SHAPE, TOTAL, VOCAB

    cfg = load_config(overrides=[*SHAPE, "attn.name=nsa", "attn.impl=triton"])
    torch.manual_seed(0)
    model = GQATransformer(cfg.model, cfg.attn, VOCAB).to(DEVICE).eval()
    for p in model.parameters():
        p.data.normal_(0.0, 0.3)
    tokens = torch.randint(0, VOCAB, (2, TOTAL), device=DEVICE)
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache(TOTAL, DEVICE, torch.float32)
        steps = [model(tokens[:, :13], cache=cache)]
        steps += [model(tokens[:, t : t + 1], cache=cache) for t in range(13, TOTAL)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-4)
