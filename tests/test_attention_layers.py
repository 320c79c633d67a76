"""Attention layers: every registered variant is causal, shaped right and trainable; the
NSA layer computes the same function through the torch ops and the reference ops."""

from __future__ import annotations

import copy

import pytest
import torch

from nsa_lab.attention import build_attention, list_variants
from nsa_lab.attention.impl import auto_impl
from nsa_lab.attention.rope import apply_rope, rope_tables
from nsa_lab.attention.topk import true_block_mass
from nsa_lab.config import ConfigError, load_config
from nsa_lab.kernels.nsa import naive, torch_ops

VARIANTS = [
    "full",
    "window",
    "nsa",
    "nsa_no_cmp",
    "nsa_no_slc",
    "nsa_no_win",
    "nsa_shared_kv",
    "topk",
]
NSA_VARIANTS = [name for name in VARIANTS if name.startswith("nsa")]
T = 45  # not a multiple of l, d or l_sel; several selection blocks beyond n
SMALL = [
    "model.d_model=32",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.head_dim=8",
    "attn.l=8",
    "attn.d=4",
    "attn.l_sel=8",
    "attn.n=3",
    "attn.w=12",
]


@pytest.fixture(autouse=True)
def small_query_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch_ops, "QUERY_CHUNK", 16)


def _layer(name: str, *overrides: str) -> torch.nn.Module:
    cfg = load_config(overrides=[f"attn.name={name}", *SMALL, *overrides])
    return build_attention(cfg.model, cfg.attn).double()


def _forward(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    cos, sin = rope_tables(8, x.shape[1], 10000.0, x.device, x.dtype)
    return layer(x, cos, sin)


def _x(t_len: int = T) -> torch.Tensor:
    return torch.randn(2, t_len, 32, dtype=torch.float64)


def test_all_variants_are_registered() -> None:
    assert sorted(v.name for v in list_variants()) == sorted(VARIANTS)
    assert all(v.description and "\n" not in v.description for v in list_variants())


@pytest.mark.parametrize("name", VARIANTS)
def test_output_shape_and_causality(name: str) -> None:
    torch.manual_seed(0)
    layer = _layer(name)
    x = _x()
    out = _forward(layer, x)
    assert out.shape == x.shape
    t = 23
    x_future = x.clone()
    x_future[:, t + 1 :] = torch.randn_like(x_future[:, t + 1 :])
    out_future = _forward(layer, x_future)
    torch.testing.assert_close(out_future[:, : t + 1], out[:, : t + 1], rtol=0, atol=1e-12)
    assert not torch.allclose(out_future[:, t + 1 :], out[:, t + 1 :])


@pytest.mark.parametrize("name", VARIANTS)
def test_gradients_are_finite(name: str) -> None:
    torch.manual_seed(1)
    layer = _layer(name)
    x = _x().requires_grad_()
    _forward(layer, x).square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    grads = {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}
    assert "q_proj.weight" in grads and "o_proj.weight" in grads
    assert all(torch.isfinite(g).all() for g in grads.values())


@pytest.mark.parametrize("name", NSA_VARIANTS)
@pytest.mark.parametrize("t_len", [T, 5], ids=["T45", "T5-below-l"])
def test_nsa_layer_matches_reference_ops(name: str, t_len: int) -> None:
    torch.manual_seed(2)
    layer = _layer(name, "attn.impl=torch")
    reference = copy.deepcopy(layer)
    reference.nsa_op = naive.nsa_reference
    x = _x(t_len)
    out, out_ref = _forward(layer, x), _forward(reference, x)
    torch.testing.assert_close(out, out_ref, rtol=1e-9, atol=1e-12)
    out.square().sum().backward()
    out_ref.square().sum().backward()
    ref_params = dict(reference.named_parameters())
    for param_name, p in layer.named_parameters():
        grad, grad_ref = _grad_or_zeros(p), _grad_or_zeros(ref_params[param_name])
        torch.testing.assert_close(grad, grad_ref, msg=param_name)


def _grad_or_zeros(p: torch.nn.Parameter) -> torch.Tensor:
    """No gradient at all (a weight that only scores, or T < l) counts as a zero gradient."""
    return torch.zeros_like(p) if p.grad is None else p.grad


@pytest.mark.parametrize(
    ("name", "branches", "k_sources"),
    [
        ("nsa", ["cmp", "slc", "win"], {"cmp", "slc", "win"}),
        ("nsa_no_cmp", ["slc", "win"], {"cmp", "slc", "win"}),
        ("nsa_no_slc", ["cmp", "win"], {"cmp", "win"}),
        ("nsa_no_win", ["cmp", "slc"], {"cmp", "slc"}),
        ("nsa_shared_kv", ["cmp", "slc", "win"], {"shared"}),
    ],
)
def test_nsa_presets_build_what_they_claim(
    name: str, branches: list[str], k_sources: set[str]
) -> None:
    torch.manual_seed(3)
    layer = _layer(name)
    assert list(layer.params.branches) == branches
    assert set(layer.k_proj) == k_sources
    assert hasattr(layer, "phi_v") == ("cmp" in branches)
    _forward(layer, _x())
    means = layer.last_gate_means
    assert list(means) == branches and all(0.0 < m < 1.0 for m in means.values())


def test_rope_rotates_in_the_tables_precision_and_returns_the_input_dtype() -> None:
    x = torch.randn(2, 40, 3, 8)
    cos, sin = rope_tables(8, 40, 10000.0, x.device, torch.float32)
    rotated = apply_rope(x.bfloat16(), cos, sin)
    assert rotated.dtype == torch.bfloat16
    exact = apply_rope(x.bfloat16().float(), cos, sin)
    torch.testing.assert_close(rotated, exact.bfloat16(), rtol=0, atol=0)


@pytest.mark.parametrize("name", NSA_VARIANTS)
def test_one_gemm_projects_every_source_as_its_own_linear_would(name: str) -> None:
    torch.manual_seed(4)
    layer, x = _layer(name), _x()
    cos, sin = rope_tables(8, T, 10000.0, x.device, x.dtype)
    keys, values = layer._projected(x, cos, sin)
    assert set(keys) == set(layer.k_proj) and set(values) == set(layer.v_proj)
    for src, proj in layer.k_proj.items():
        torch.testing.assert_close(keys[src], layer.keys(proj, x, cos, sin), rtol=0, atol=1e-12)
    for src, proj in layer.v_proj.items():
        torch.testing.assert_close(values[src], layer.values(proj, x), rtol=0, atol=1e-12)


def test_triton_impl_without_a_gpu_fails_with_a_clear_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="attn.impl='triton'.*need a CUDA GPU"):
        _layer("nsa", "attn.impl=triton")


def test_auto_picks_triton_on_cuda_and_torch_on_cpu() -> None:
    assert auto_impl(torch.device("cuda", 0)) == "triton"
    assert auto_impl(torch.device("cpu")) == "torch"


def test_topk_selecting_every_block_is_full_attention() -> None:
    torch.manual_seed(5)
    full, topk = _layer("full"), _layer("topk", "attn.n=6")  # ceil(45 / 8) = 6 blocks
    topk.load_state_dict(full.state_dict())
    x = _x()
    torch.testing.assert_close(_forward(topk, x), _forward(full, x))
    sparse = _layer("topk")
    sparse.load_state_dict(full.state_dict())
    assert not torch.allclose(_forward(sparse, x), _forward(full, x))


def test_true_block_mass_is_exact_attention_mass() -> None:
    """Mass per block equals the dense causal softmax summed over the group and block."""
    torch.manual_seed(6)
    q = torch.randn(2, 21, 4, 3, dtype=torch.float64)
    k = torch.randn(2, 21, 2, 3, dtype=torch.float64)
    mass = true_block_mass(q, k, l_sel=4)
    logits = torch.einsum("bthd,bshd->bhts", q, k.repeat_interleave(2, dim=2)) / 3**0.5
    causal = torch.ones(21, 21, dtype=torch.bool).tril()
    probs = logits.masked_fill(~causal, float("-inf")).softmax(-1)  # [B, H, T, S]
    per_group = probs.unflatten(1, (2, 2)).sum(2)  # [B, G, T, S]
    expected = torch.nn.functional.pad(per_group, (0, 3)).unflatten(-1, (6, 4)).sum(-1)
    torch.testing.assert_close(mass, expected.permute(0, 2, 1, 3))


def test_rope_preserves_norms_and_depends_on_relative_position() -> None:
    torch.manual_seed(7)
    cos, sin = rope_tables(8, 12, 10000.0, "cpu", torch.float64)
    q, k = torch.randn(2, 1, 1, 1, 8, dtype=torch.float64)

    def rotated(x: torch.Tensor, t: int) -> torch.Tensor:
        return apply_rope(x, cos[t : t + 1], sin[t : t + 1])

    torch.testing.assert_close(rotated(q, 5).norm(), q.norm())
    score = (rotated(q, 7) * rotated(k, 3)).sum()
    torch.testing.assert_close(score, (rotated(q, 10) * rotated(k, 6)).sum())
    assert not torch.allclose(score, (rotated(q, 10) * rotated(k, 3)).sum())
