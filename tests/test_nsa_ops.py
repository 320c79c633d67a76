"""NSA ops: the torch implementation against the loop reference, and the reference
against hand-computed cases of docs/nsa.md."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import torch

from nsa_lab.kernels.nsa import naive, torch_ops
from nsa_lab.kernels.nsa.spec import BRANCHES, NSAParams

SUBSETS = [c for r in (1, 2, 3) for c in itertools.combinations(BRANCHES, r)]


@dataclass(frozen=True)
class Case:
    """One input geometry; T is deliberately not a multiple of l, d or l_sel."""

    b: int
    t: int
    h: int
    g: int
    dk: int
    dv: int
    l: int
    d: int
    l_sel: int
    n: int
    w: int
    force: bool = True

    def params(self, branches: tuple[str, ...]) -> NSAParams:
        return NSAParams(self.l, self.d, self.l_sel, self.n, self.w, branches, self.force)

    @property
    def n_cmp(self) -> int:
        return max(0, (self.t - self.l) // self.d + 1)


CASES = {
    "T37-gqa2": Case(2, 37, 4, 2, 6, 5, l=8, d=4, l_sel=8, n=3, w=9),
    "T50-gqa1": Case(2, 50, 3, 3, 5, 7, l=8, d=4, l_sel=16, n=3, w=13),
    "T77-gqa4": Case(2, 77, 4, 1, 4, 4, l=12, d=4, l_sel=12, n=4, w=20),
    # No compressed block at all; slc and win both reduce to causal attention (w >= T).
    "T6-below-l": Case(2, 6, 2, 1, 4, 3, l=8, d=4, l_sel=8, n=3, w=8),
    "T45-l=d-no-force": Case(2, 45, 4, 2, 4, 6, l=4, d=4, l_sel=8, n=2, w=7, force=False),
}


@pytest.fixture(autouse=True)
def small_query_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Several (and ragged) query chunks even at these short lengths."""
    monkeypatch.setattr(torch_ops, "QUERY_CHUNK", 16)


def _leaf(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


def _inputs(case: Case, branches: tuple[str, ...], shared_kv: bool) -> dict[str, torch.Tensor]:
    """Random leaves for exactly the tensors the active branches take."""
    c = case
    tensors = {"q": _leaf(c.b, c.t, c.h, c.dk), "gates": _leaf(c.b, c.t, c.h, len(branches))}
    if "cmp" in branches or "slc" in branches:
        tensors["kc"] = _leaf(c.b, c.n_cmp, c.g, c.dk)
    if "cmp" in branches:
        tensors["vc"] = _leaf(c.b, c.n_cmp, c.g, c.dv)
    shared = {"k": _leaf(c.b, c.t, c.g, c.dk), "v": _leaf(c.b, c.t, c.g, c.dv)}
    for name in ("slc", "win"):
        if name in branches:
            for kind in ("k", "v"):
                fresh = _leaf(c.b, c.t, c.g, c.dk if kind == "k" else c.dv)
                tensors[f"{kind}_{name}"] = shared[kind] if shared_kv else fresh
    return tensors


def _run(op, tensors: dict[str, torch.Tensor], params: NSAParams) -> torch.Tensor:
    rest = {k: v for k, v in tensors.items() if k not in ("q", "gates")}
    return op(tensors["q"], tensors["gates"], params, **rest)


def _grads(
    out: torch.Tensor, cotangent: torch.Tensor, leaves: list[torch.Tensor]
) -> tuple[torch.Tensor, ...]:
    """Gradients, with zeros where a leaf does not reach ``out`` at all."""
    return torch.autograd.grad(out, leaves, cotangent, allow_unused=True, materialize_grads=True)


@pytest.mark.parametrize("shared_kv", [False, True], ids=["indep-kv", "shared-kv"])
@pytest.mark.parametrize("branches", SUBSETS, ids=["+".join(s) for s in SUBSETS])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_torch_matches_reference(case: Case, branches: tuple[str, ...], shared_kv: bool) -> None:
    torch.manual_seed(0)
    tensors = _inputs(case, branches, shared_kv)
    params = case.params(branches)
    fast = _run(torch_ops.nsa_attention, tensors, params)
    slow = _run(naive.nsa_reference, tensors, params)
    assert fast.shape == (case.b, case.t, case.h, case.dv)
    torch.testing.assert_close(fast, slow, rtol=1e-9, atol=1e-11)

    leaves = _distinct(tensors)
    cotangent = torch.randn_like(fast)
    grads_fast = _grads(fast, cotangent, list(leaves.values()))
    grads_slow = _grads(slow, cotangent, list(leaves.values()))
    for name, g_fast, g_slow in zip(leaves, grads_fast, grads_slow, strict=True):
        assert torch.isfinite(g_fast).all(), name
        torch.testing.assert_close(g_fast, g_slow, rtol=1e-9, atol=1e-11, msg=name)
    if "cmp" not in branches and "kc" in leaves:  # kc only scores slc: a discrete choice
        assert not grads_fast[list(leaves).index("kc")].any()


def _distinct(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inputs with shared K/V listed once, under their first name."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if all(tensor is not seen for seen in out.values()):
            out[name] = tensor
    return out


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_selection_scores_match_reference(case: Case) -> None:
    torch.manual_seed(1)
    q = torch.randn(case.b, case.t, case.h, case.dk, dtype=torch.float64)
    kc = torch.randn(case.b, case.n_cmp, case.g, case.dk, dtype=torch.float64)
    vc = torch.randn(case.b, case.n_cmp, case.g, case.dv, dtype=torch.float64)
    _, lse = torch_ops.compression_attention(q, kc, vc, case.l, case.d)
    fast = torch_ops.selection_scores(q, kc, lse, case.l, case.d, case.l_sel)
    p_cmp = naive.reference_cmp_probs(q, kc, case.l, case.d)
    slow = naive.reference_selection_scores(p_cmp, case.l, case.d, case.l_sel, case.g)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch_ops.compression_lse(q, kc, case.l, case.d), lse)


@pytest.mark.parametrize("force", [True, False])
def test_select_blocks_matches_reference_with_ties(force: bool) -> None:
    """Scores drawn from {0, 1, 2} force many ties: both must break them to the lower index."""
    torch.manual_seed(2)
    l_sel, n, t_len = 4, 4, 45
    scores = torch.randint(0, 3, (2, t_len, 3, 12)).double()
    fast = torch_ops.select_blocks(scores, n, l_sel, force)
    slow = naive.reference_select_blocks(scores, n, l_sel, force)
    assert fast.shape == slow.shape == (2, t_len, 3, n)
    assert torch.equal(_as_sets(fast), _as_sets(slow))


def _as_sets(indices: torch.Tensor) -> torch.Tensor:
    """Ascending indices with the -1 padding last: a selection is a set, not a ranking."""
    big = torch.iinfo(indices.dtype).max
    ordered = indices.masked_fill(indices < 0, big).sort(dim=-1).values
    return ordered.masked_fill(ordered == big, -1)


# --- the reference against the spec, on hand-computable cases ---------------------


def test_overlap_mapping_is_identity_when_l_equals_l_sel_equals_d() -> None:
    torch.manual_seed(3)
    p_cmp = torch.rand(2, 20, 3, 5, dtype=torch.float64)  # T=20, l=d=4 -> Nc = Nsel = 5
    scores = naive.reference_selection_scores(p_cmp, l=4, d=4, l_sel=4, n_groups=3)
    torch.testing.assert_close(scores, p_cmp)


def test_overlap_mapping_counts_shared_segments() -> None:
    """l=8, d=4, l'=8: cmp block i covers segments i, i+1; sel block j covers 2j, 2j+1."""
    p_cmp = torch.zeros(1, 16, 1, 3, dtype=torch.float64)  # T=16: Nc=3, Nsel=2
    p_cmp[..., 1] = 1.0  # block 1 = positions 4..11: half in sel block 0, half in sel block 1
    p_cmp[..., 2] = 10.0  # block 2 = positions 8..15: both segments in sel block 1
    scores = naive.reference_selection_scores(p_cmp, l=8, d=4, l_sel=8, n_groups=1)
    assert scores[0, 0, 0].tolist() == [1.0, 1.0 + 2 * 10.0]


def test_group_scores_sum_over_the_groups_heads() -> None:
    p_cmp = torch.zeros(1, 8, 4, 2, dtype=torch.float64)
    p_cmp[..., 0] = torch.tensor([1.0, 2.0, 4.0, 8.0])  # heads 0,1 -> group 0; 2,3 -> group 1
    scores = naive.reference_selection_scores(p_cmp, l=4, d=4, l_sel=4, n_groups=2)
    assert scores[0, 0, :, 0].tolist() == [3.0, 12.0]


def _choice(scores: list[float], t: int, n: int, l_sel: int, force: bool = True) -> list[int]:
    tensor = torch.tensor(scores, dtype=torch.float64).expand(1, t + 1, 1, len(scores))
    chosen = naive.reference_select_blocks(tensor, n, l_sel, force)[0, t, 0].tolist()
    fast = torch_ops.select_blocks(tensor, n, l_sel, force)[0, t, 0]
    assert sorted(chosen) == sorted(fast.tolist())
    return chosen


def test_forced_blocks_are_always_selected() -> None:
    # t=21 is in block 5 (l'=4): blocks 0, 4, 5 are forced despite the lowest scores.
    scores = [0.0, 9.0, 8.0, 7.0, 0.0, 0.0]
    assert _choice(scores, t=21, n=4, l_sel=4) == [0, 1, 4, 5]
    assert _choice(scores, t=21, n=4, l_sel=4, force=False) == [0, 1, 2, 3]  # 0 wins a tie


def test_ties_go_to_the_lower_index() -> None:
    assert _choice([1.0] * 6, t=23, n=2, l_sel=4, force=False) == [0, 1]
    assert _choice([1.0] * 6, t=23, n=4, l_sel=4) == [0, 1, 4, 5]


def test_query_that_sees_at_most_n_blocks_selects_all_of_them() -> None:
    # t=5 sees blocks 0 and 1 only; block 2 is in the future, slots past the visible pad -1.
    assert _choice([0.0, 0.0, 5.0], t=5, n=4, l_sel=4, force=False) == [0, 1, -1, -1]


@pytest.mark.parametrize(
    "op", [naive.reference_window_attention, torch_ops.sliding_window_attention]
)
def test_window_covers_exactly_w_positions(op) -> None:
    """q = 0 makes attention uniform, v = one-hot positions exposes the weights."""
    torch.manual_seed(7)
    t_len, w = 21, 5
    q = torch.zeros(1, t_len, 2, 3, dtype=torch.float64)
    k = torch.randn(1, t_len, 1, 3, dtype=torch.float64)
    v = torch.eye(t_len, dtype=torch.float64)[None, :, None, :]
    weights = op(q, k, v, w)[0, :, 0]
    for t in range(t_len):
        lo = max(0, t - w + 1)
        expected = torch.zeros(t_len, dtype=torch.float64)
        expected[lo : t + 1] = 1.0 / (t + 1 - lo)
        torch.testing.assert_close(weights[t], expected)


def test_selection_attends_its_blocks_causally() -> None:
    torch.manual_seed(8)
    t_len, l_sel = 12, 4
    q = torch.zeros(1, t_len, 1, 2, dtype=torch.float64)
    k = torch.randn(1, t_len, 1, 2, dtype=torch.float64)
    v = torch.eye(t_len, dtype=torch.float64)[None, :, None, :]
    indices = torch.full((1, t_len, 1, 2), -1)
    indices[0, :, 0, 0] = torch.arange(t_len) // l_sel  # everyone sees its own block
    indices[0, 9, 0] = torch.tensor([0, 2])  # t=9 in block 2: positions 0..3 and 8..9
    at_9 = torch.tensor([1 / 6] * 4 + [0] * 4 + [1 / 6] * 2 + [0] * 2, dtype=torch.float64)
    at_1 = torch.tensor([0.5, 0.5] + [0.0] * 10, dtype=torch.float64)
    for op in (naive.reference_selection_attention, torch_ops.selection_attention):
        weights = op(q, k, v, indices, l_sel)[0, :, 0]
        torch.testing.assert_close(weights[9], at_9)
        torch.testing.assert_close(weights[1], at_1)


@pytest.mark.parametrize("op", [naive.reference_compression, torch_ops.compression_attention])
def test_compression_averages_visible_blocks_and_zeroes_blind_queries(op) -> None:
    """l=4, d=2: block i ends at 2i+3. With q = 0 the output is the mean of visible vc."""
    torch.manual_seed(4)
    t_len, l, d = 10, 4, 2
    q = torch.zeros(1, t_len, 2, 3, dtype=torch.float64, requires_grad=True)
    kc = torch.randn(1, 4, 1, 3, dtype=torch.float64, requires_grad=True)
    vc = torch.randn(1, 4, 1, 5, dtype=torch.float64, requires_grad=True)
    out = op(q, kc, vc, l, d)[0]
    for t in range(t_len):
        n_visible = sum(1 for i in range(4) if 2 * i + 3 <= t)
        expected = vc[0, :n_visible, 0].mean(0) if n_visible else torch.zeros(5).double()
        torch.testing.assert_close(out[0, t, 0], expected)
    assert torch.equal(out[0, :3], torch.zeros_like(out[0, :3]))  # t < l-1 sees nothing
    grads = torch.autograd.grad(out.sum(), (q, kc, vc))
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.equal(grads[0][0, :3], torch.zeros_like(grads[0][0, :3]))


@pytest.mark.parametrize("op", [naive.nsa_reference, torch_ops.nsa_attention])
def test_sequence_shorter_than_l_gives_zero_cmp_and_finite_grads(op) -> None:
    torch.manual_seed(5)
    case = CASES["T6-below-l"]
    tensors = _inputs(case, BRANCHES, shared_kv=False)
    out = _run(op, tensors, case.params(BRANCHES))
    cmp_only = _run(op, {**tensors, "gates": tensors["gates"][..., :1]}, case.params(("cmp",)))
    assert torch.equal(cmp_only, torch.zeros_like(cmp_only))
    grads = _grads(out, torch.ones_like(out), list(tensors.values()))
    assert all(torch.isfinite(g).all() for g in grads)


def test_gates_weight_each_branch_output() -> None:
    torch.manual_seed(6)
    case = CASES["T37-gqa2"]
    tensors = _inputs(case, ("slc", "win"), shared_kv=False)
    gates = torch.rand(case.b, case.t, case.h, 2, dtype=torch.float64)
    out = _run(naive.nsa_reference, {**tensors, "gates": gates}, case.params(("slc", "win")))
    q, k_win, v_win = tensors["q"], tensors["k_win"], tensors["v_win"]
    window = naive.reference_window_attention(q, k_win, v_win, case.w)
    only_win = _run(
        naive.nsa_reference,
        {**tensors, "gates": torch.stack([torch.zeros_like(gates[..., 0]), gates[..., 1]], -1)},
        case.params(("slc", "win")),
    )
    torch.testing.assert_close(only_win, gates[..., 1:] * window)
    assert not torch.allclose(out, only_win)
