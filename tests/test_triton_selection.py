"""The selection-branch Triton kernels against the PyTorch ops they replace.

Block choice (score + top-n kernels) must pick the same sets as ``selection_scores`` +
``select_blocks`` on float64; group-centric selection attention must match
``selection_attention`` in output and in dq, dk, dv. Shapes are tiny: under Triton's CPU
interpreter (no GPU) every program runs in Python. Outputs the kernels allocate are
poisoned (NaN / a bogus index), so an element no kernel writes fails the comparison.
"""

from __future__ import annotations

import itertools
import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from nsa_lab.evaluation.selection import mean_tile_union  # noqa: E402
from nsa_lab.kernels.nsa import triton_selection  # noqa: E402
from nsa_lab.kernels.nsa.torch_ops import (  # noqa: E402
    compression_attention,
    select_blocks,
    selection_attention,
    selection_scores,
)
from nsa_lab.kernels.nsa.triton_selection import (  # noqa: E402
    select_blocks_triton,
    selection_attention_backward,
    selection_attention_forward,
    selection_attention_triton,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# float32 dots are true fp32 everywhere (triton_tuning.dot_precision); the GPU bound dates from
# when they were TF32 there and has not been re-checked tighter on a GPU.
TOL = 5e-3 if DEVICE == "cuda" else 1e-3
L, D = 8, 4  # compression block length and stride
POISON_INDEX = 77


@pytest.fixture
def poisoned(monkeypatch: pytest.MonkeyPatch) -> None:
    """``torch.empty``/``empty_like`` hand out NaN (float) or ``POISON_INDEX`` (int) memory."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(x: torch.Tensor) -> torch.Tensor:
        return x.fill_(math.nan if x.is_floating_point() else POISON_INDEX)

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison(empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poison(empty_like(*a, **kw)))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all(), "NaN or inf in the Triton result"
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()


def randn(*shape: int, pad_last: int = 0) -> torch.Tensor:
    """A random tensor viewed out of a wider one: kernels must honour strides."""
    return torch.randn(*shape[:-1], shape[-1] + pad_last, device=DEVICE)[..., : shape[-1]]


@pytest.mark.parametrize(
    ("t_len", "hpg", "g", "dk", "l_sel", "n", "force", "chunk", "lse_inf"),
    [
        (5, 3, 2, 32, 8, 3, True, 16, True),  # no compressed block exists
        (37, 3, 2, 24, 8, 4, True, 16, False),  # 3 chunks, non-power-of-2 dim
        (37, 1, 2, 32, 16, 3, False, 8, True),
        (70, 3, 1, 32, 16, 4, False, 32, False),
        (70, 16, 1, 16, 8, 3, True, 64, True),  # the paper's 16 heads per group
        (140, 3, 1, 16, 8, 6, False, 64, False),  # 18 blocks: cmp blocks spill across tiles
    ],
)
def test_select_blocks_picks_the_torch_sets(
    poisoned, t_len, hpg, g, dk, l_sel, n, force, chunk, lse_inf
):
    torch.manual_seed(t_len * 100 + hpg * 10 + l_sel)
    b, n_cmp = 2, max(0, (t_len - L) // D + 1)
    q, kc = randn(b, t_len, g * hpg, dk, pad_last=3), randn(b, n_cmp, g, dk)
    _, lse = compression_attention(q, kc, kc, L, D)
    if lse_inf:  # the Triton cmp kernel's convention for queries that see no block
        lse[:, : L - 1] = -math.inf
    idx = select_blocks_triton(
        q, kc, lse, l=L, d=D, l_sel=l_sel, n=n, force_init_local=force, scale=None,
        query_chunk=chunk,
    )  # fmt: skip
    _, lse64 = compression_attention(q.double(), kc.double(), kc.double(), L, D)
    scores = selection_scores(q.double(), kc.double(), lse64, L, D, l_sel)
    ref = select_blocks(scores, n, l_sel, force)
    assert idx.dtype == torch.int32 and idx.shape == ref.shape
    assert torch.equal(idx.long().sort(dim=-1).values, ref.sort(dim=-1).values)


@pytest.mark.parametrize("force", [True, False])
def test_top_n_breaks_ties_toward_the_lower_index(poisoned, force):
    torch.manual_seed(1)
    t_len, l_sel, n = 40, 8, 4
    scores = torch.randint(0, 3, (2, t_len, 2, math.ceil(t_len / l_sel)), device=DEVICE).float()
    out = torch.empty(2, t_len, 2, n, dtype=torch.int32, device=DEVICE)
    by_group = scores.permute(0, 2, 1, 3)  # the kernel's [B, G, rows, Nsel] layout, as a view
    for start, end in [(0, 16), (16, t_len)]:
        triton_selection._top_n(
            by_group[:, :, start:end], out, start, n=n, l_sel=l_sel, force_init_local=force
        )
    assert torch.equal(out.long(), select_blocks(scores, n, l_sel, force))  # rank order too


def assert_selection_attention_matches_torch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, indices: torch.Tensor, l_sel: int
) -> tuple[torch.Tensor, ...]:
    """Output and dq, dk, dv of the Triton kernels against float64 ``selection_attention``.

    Returns the Triton output and gradients for further checks.
    """
    out = selection_attention_triton(q, k, v, indices, l_sel=l_sel, scale=None)
    doubles = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = selection_attention(*doubles, indices.long(), l_sel)
    assert rel_err(out, ref) < TOL
    grad = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (q, k, v), grad.float())
    ref_grads = torch.autograd.grad(ref, doubles, grad)
    for name, a, r in zip("qkv", grads, ref_grads, strict=True):
        assert rel_err(a, r) < TOL, f"d{name}"
    return (out, *grads)


def random_qkv(
    b: int, t_len: int, hpg: int, g: int, dk: int, dv: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Leaf ``q, k, v`` as strided views (padded rows, k with groups outermost)."""
    q = randn(b, t_len, g * hpg, dk, pad_last=5).requires_grad_()
    k = torch.randn(b, g, t_len, dk, device=DEVICE).transpose(1, 2).requires_grad_()
    v = randn(b, t_len, g, dv, pad_last=2).requires_grad_()
    return q, k, v


def shuffled_slots(indices: torch.Tensor) -> torch.Tensor:
    """``indices`` with each row's slots in random order (empty slots anywhere), as int32."""
    order = torch.rand(indices.shape, device=indices.device).argsort(-1)
    return indices.gather(-1, order).int()


@pytest.mark.parametrize(
    ("t_len", "hpg", "g", "dk", "dv", "l_sel", "n", "force", "max_queries"),
    [
        (5, 3, 1, 32, 16, 8, 3, True, 256),  # 4 positions per tile, one ragged tile
        (37, 3, 2, 32, 16, 8, 4, False, 8),  # Dk != Dv; block lists cut into pieces
        (70, 1, 2, 24, 24, 16, 3, True, 16),  # 16 per tile; non-power-of-2 dim, ragged block
        (45, 2, 2, 16, 32, 8, 5, False, 32),  # 8 per tile, 45 = 5 * 8 + 5
        (29, 4, 1, 32, 32, 8, 3, True, 64),  # 4 per tile, 29 = 7 * 4 + 1
        (19, 16, 1, 16, 16, 8, 2, False, 256),  # the paper's 16 heads: one position per tile
    ],
)
def test_selection_attention_matches_torch(
    poisoned, monkeypatch, t_len, hpg, g, dk, dv, l_sel, n, force, max_queries
):
    torch.manual_seed(t_len + hpg)
    monkeypatch.setattr(triton_selection, "DKDV_MAX_QUERIES", max_queries)
    q, k, v = random_qkv(2, t_len, hpg, g, dk, dv)
    scores = torch.rand(2, t_len, g, math.ceil(t_len / l_sel), device=DEVICE)
    # Slot order must not matter: shuffle so that empty (-1) slots sit anywhere.
    indices = shuffled_slots(select_blocks(scores, n, l_sel, force))
    assert_selection_attention_matches_torch(q, k, v, indices, l_sel)


@pytest.mark.parametrize("hpg", [1, 4])
def test_selection_attention_rows_that_see_no_key_or_share_blocks(poisoned, hpg):
    """Hand-made choices within tiles: no key at all, overlaps, one block in many slots.

    Rows that see no key (every slot empty, or only a later block chosen) must give
    ``o = 0`` and zero gradients, as the reference does, while their tile neighbours
    attend normally.
    """
    torch.manual_seed(100 + hpg)
    b, t_len, g, l_sel, n = 2, 27, 2, 4, 4
    q, k, v = random_qkv(b, t_len, hpg, g, 16, 16)
    scores = torch.rand(b, t_len, g, math.ceil(t_len / l_sel), device=DEVICE)
    indices = select_blocks(scores, n, l_sel, False)  # random: partial overlaps
    indices[0, 0, 0] = -1  # every slot empty
    indices[1, 5, 1] = torch.tensor([-1, 3, -1, -1])  # only a block after its own
    indices[0, 9, 1] = torch.tensor([-1, -1, 2, -1])  # its own block only: keys 8 and 9
    indices[:, 12:16] = torch.tensor([3, 1, 0, -1])  # a whole tile of 4 with one choice
    indices[1, 26, 0] = torch.tensor([6, -1, 0, -1])  # the ragged last tile
    indices = shuffled_slots(indices).long()  # int64 indices are accepted too
    out, dq, _, _ = assert_selection_attention_matches_torch(q, k, v, indices, l_sel)
    for batch, t, group in [(0, 0, 0), (1, 5, 1)]:
        heads = slice(group * hpg, (group + 1) * hpg)
        assert not out[batch, t, heads].any() and not dq[batch, t, heads].any()


@pytest.mark.parametrize("hpg", [4, 1])
def test_forward_writes_each_tiles_block_union_once(poisoned, hpg):
    """The forward kernel builds every tile's union of chosen blocks (the dQ kernel walks
    it again): each distinct block once, descending, then -1 to the row's end, also in
    the ragged last tile (50 positions fill no whole number of tiles of 4 or more)."""
    torch.manual_seed(hpg)
    qpp = triton_selection._positions_per_tile(hpg)
    b, t_len, g, l_sel, n = 2, 50, 2, 4, 3
    q, k, v = random_qkv(b, t_len, hpg, g, 16, 16)
    scores = torch.rand(b, t_len, g, math.ceil(t_len / l_sel), device=DEVICE)
    indices = shuffled_slots(select_blocks(scores, n, l_sel, False))
    indices[0, 3, 1, 0] = -1  # an empty slot
    with torch.no_grad():
        _, _, tiles = triton_selection._selection_attention_op(q, k, v, indices, l_sel, 0.25)
    assert tiles.dtype == torch.int32
    assert tiles.shape == (b, math.ceil(t_len / qpp), g, qpp * n)
    for batch, tile, group in itertools.product(range(b), range(tiles.shape[1]), range(g)):
        chosen = indices[batch, tile * qpp : (tile + 1) * qpp, group].flatten().tolist()
        union = sorted({block for block in chosen if block >= 0}, reverse=True)
        assert tiles[batch, tile, group].tolist() == union + [-1] * (qpp * n - len(union))
    # The PyTorch diagnostic of union sizes (scripts/selection_unions.py) counts the same.
    kernel_mean = (tiles >= 0).sum(-1).float().mean().item()  # approx of a CUDA tensor fails
    assert mean_tile_union(indices, qpp) == pytest.approx(kernel_mean)


@pytest.mark.parametrize("hpg", [16, 32])
def test_one_position_tiles_store_no_union(poisoned, hpg):
    """At 16 or more heads per group a tile is one position: its union is its own choices,
    which the kernels sort in registers; nothing is stored, and the output and gradients
    still match (empty slots anywhere, a block chosen after the position's own)."""
    torch.manual_seed(hpg)
    b, t_len, g, l_sel, n = 2, 21, 1, 4, 3
    assert triton_selection._positions_per_tile(hpg) == 1
    q, k, v = random_qkv(b, t_len, hpg, g, 16, 16)
    scores = torch.rand(b, t_len, g, math.ceil(t_len / l_sel), device=DEVICE)
    indices = select_blocks(scores, n, l_sel, False)
    indices[0, 2, 0] = torch.tensor([-1, 4, -1])  # only a later block: sees no key
    indices = shuffled_slots(indices)
    with torch.no_grad():
        _, _, tiles = triton_selection._selection_attention_op(q, k, v, indices, l_sel, 0.25)
    assert tiles.shape == (b, t_len, g, 0)
    out, dq, _, _ = assert_selection_attention_matches_torch(q, k, v, indices, l_sel)
    assert not out[0, 2].any() and not dq[0, 2].any()


@pytest.mark.parametrize("accumulate", [False, True], ids=["write", "accumulate"])
@pytest.mark.parametrize("hpg", [3, 16])
def test_gated_backward_is_the_gradient_of_gate_times_o(poisoned, hpg, accumulate):
    """The fused NSA backward's entry point: from the ungated ``do`` and a gate (both
    signs, a strided view), ``dk, dv`` and the ``dq`` of ``gate * o``, written over a NaN
    ``dq`` or added to what ``dq`` holds."""
    torch.manual_seed(hpg)
    t_len, g, l_sel, n = 29, 2, 8, 3
    q, k, v = random_qkv(2, t_len, hpg, g, 32, 16)
    scores = torch.rand(2, t_len, g, math.ceil(t_len / l_sel), device=DEVICE)
    indices = shuffled_slots(select_blocks(scores, n, l_sel, False))
    o = selection_attention_triton(q, k, v, indices, l_sel=l_sel)
    gate = torch.randn(2, t_len, g * hpg, 3, device=DEVICE)[..., 2]
    do = torch.randn_like(o)
    want = torch.autograd.grad(o, (q, k, v), gate[..., None] * do)
    detached = [x.detach() for x in (q, k, v)]
    o, lse, tiles = selection_attention_forward(
        *detached, indices, l_sel=l_sel, scale=1 / math.sqrt(32)
    )
    base = torch.randn(q.shape, device=DEVICE) if accumulate else torch.full_like(q, math.nan)
    dq = base.clone()
    dk, dv = selection_attention_backward(
        *detached, indices, tiles, o, lse, do, dq,
        l_sel=l_sel, scale=1 / math.sqrt(32), gate=gate, accumulate=accumulate,
    )  # fmt: skip
    got_dq = dq - base if accumulate else dq
    for name, got, ref in zip("qkv", (got_dq, dk, dv), want, strict=True):
        assert rel_err(got, ref) < TOL, f"d{name}"
