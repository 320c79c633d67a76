"""The range-attention kernels (window and compression branches) against the PyTorch ops.

Runs on the GPU when there is one, else under Triton's CPU interpreter. References are
computed in float64 from the same float32 inputs. Every kernel output buffer is
poisoned with NaN before the kernels run, so an element a kernel forgets to write fails.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from nsa_lab.kernels.nsa import triton_range_attention  # noqa: E402
from nsa_lab.kernels.nsa.torch_ops import (  # noqa: E402
    compression_attention,
    sliding_window_attention,
)
from nsa_lab.kernels.nsa.triton_range_attention import (  # noqa: E402
    range_attention,
    range_attention_backward,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# float32 dots are true fp32 everywhere (triton_tuning.dot_precision); the GPU bound dates from
# when they were TF32 there and has not been re-checked tighter on a GPU.
TOL = 5e-3 if DEVICE == "cuda" else 1e-3
SCALE = 0.3


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Allocate every kernel output as NaN instead of uninitialised memory."""

    def nan_filled(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        return torch.full(shape, math.nan, dtype=dtype, device=device)

    monkeypatch.setattr(triton_range_attention, "_empty", nan_filled)


def assert_close(out: torch.Tensor, ref: torch.Tensor, name: str) -> None:
    """``||out - ref|| / ||ref|| < TOL``; absolute when ``ref`` is (near) zero, e.g. w=1 grads."""
    assert torch.isfinite(out).all(), f"{name}: NaN or inf"
    err = (out.double() - ref).norm() / ref.norm().clamp_min(1.0)
    assert err < TOL, f"{name}: error {err:.2e}"


def make_inputs(
    b: int, t_len: int, s_len: int, h: int, g: int, dk: int, dv: int
) -> tuple[torch.Tensor, ...]:
    """Strided views, as the model produces them: q a transpose, k and v slices of one tensor."""
    q = torch.randn(b, h, t_len, dk, device=DEVICE).transpose(1, 2).requires_grad_()
    kv = torch.randn(b, s_len, g, dk + dv, device=DEVICE, requires_grad=True)
    k, v = kv.split([dk, dv], dim=-1)
    return q, k, v


def compare(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_kwargs: dict,
    reference,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """Check ``o, dq, dk, dv`` against ``reference(q, k, v)`` in float64; return o, lse, grads.

    The output gradient is a strided view too, to exercise the ``do`` strides.
    """
    o, lse = range_attention(q, k, v, scale=SCALE, **kernel_kwargs)
    assert o.dtype == q.dtype and lse.dtype == torch.float32
    assert o.shape == (*q.shape[:3], v.shape[-1]) and lse.shape == q.shape[:3]
    doubles = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = reference(*doubles)
    assert_close(o, ref, "o")
    grad_out = torch.randn(o.shape[0], o.shape[2], o.shape[1], o.shape[3], device=DEVICE)
    grad_out = grad_out.transpose(1, 2)
    grads = torch.autograd.grad(o, (q, k, v), grad_out)
    ref_grads = torch.autograd.grad(ref, doubles, grad_out.double())
    for name, grad, ref_grad in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
        assert_close(grad, ref_grad, name)
    return o, lse, grads


@pytest.mark.parametrize(
    ("t_len", "w", "h", "g", "dk", "dv"),
    [
        (37, 1, 2, 2, 16, 16),
        (37, 50, 3, 1, 32, 16),
        (70, 16, 2, 2, 24, 24),
        (70, 50, 3, 1, 16, 32),
    ],
    ids=["T37-w1", "T37-w50>T-gqa3-dk!=dv", "T70-w16-d24", "T70-w50-gqa3"],
)
def test_window_matches_torch_ops(t_len, w, h, g, dk, dv):
    torch.manual_seed(t_len * 100 + w)
    q, k, v = make_inputs(2, t_len, t_len, h, g, dk, dv)
    kwargs = {"stride": 1, "offset": 0, "window": w}

    def reference(q, k, v):
        return sliding_window_attention(q, k, v, w, SCALE)

    _, lse, _ = compare(q, k, v, kwargs, reference)
    hpg = h // g
    logits = torch.einsum("bthd,bshd->bhts", q.double(), k.double().repeat_interleave(hpg, 2))
    distance = torch.arange(t_len, device=DEVICE)[:, None] - torch.arange(t_len, device=DEVICE)
    seen = (distance >= 0) & (distance < w)
    ref_lse = (logits * SCALE).masked_fill(~seen, -math.inf).logsumexp(-1).transpose(1, 2)
    assert_close(lse, ref_lse, "lse")


@pytest.mark.parametrize(
    ("t_len", "l", "d", "n_cmp", "h", "g", "dk", "dv"),
    [
        (5, 8, 4, 2, 2, 2, 16, 16),
        (37, 8, 4, 8, 3, 1, 32, 16),
        (37, 8, 4, 5, 2, 2, 16, 16),
        (70, 16, 8, 7, 2, 2, 24, 24),
        (70, 8, 4, 16, 3, 1, 16, 32),
    ],
    ids=[
        "T5-sees-none",
        "T37-l8d4-gqa3-dk!=dv",
        "T37-fewer-blocks-than-fit",
        "T70-l16d8-d24",
        "T70-l8d4-gqa3",
    ],
)
def test_compression_matches_torch_ops(t_len, l, d, n_cmp, h, g, dk, dv):
    """``n_cmp = (T - l) // d + 1`` blocks fit; T=5 still gets 2 (seen by none) so the
    kernels run, and one case passes fewer than fit, so some tile ends past the keys."""
    torch.manual_seed(t_len * 100 + l + n_cmp)
    q, k, v = make_inputs(2, t_len, n_cmp, h, g, dk, dv)
    kwargs = {"stride": d, "offset": l - 1, "window": None}

    def reference(q, k, v):
        return compression_attention(q, k, v, l, d, SCALE)[0]

    o, lse, (dq, _, _) = compare(q, k, v, kwargs, reference)
    blind = slice(0, min(l - 1, t_len))  # the queries that see no block
    assert (o[:, blind] == 0).all() and (dq[:, blind] == 0).all()
    assert (lse[:, blind] == -math.inf).all() and torch.isfinite(lse[:, l - 1 :]).all()
    doubles = [x.detach().double() for x in (q, k, v)]
    ref_lse = compression_attention(*doubles, l, d, SCALE)[1]
    if t_len >= l:
        assert_close(lse[:, l - 1 :], ref_lse[:, l - 1 :], "lse")


def test_no_keys_gives_zeros():
    """No compressed block at all (``T < l``): zeros, ``lse = -inf``, zero gradients."""
    q, k, v = make_inputs(2, 6, 0, 2, 1, 16, 16)
    o, lse = range_attention(q, k, v, stride=4, offset=7, window=None, scale=SCALE)
    assert (o == 0).all() and (lse == -math.inf).all()
    dq, dk, dv = torch.autograd.grad(o.sum(), (q, k, v))
    assert (dq == 0).all() and dk.shape == k.shape and dv.shape == v.shape


def test_broadcast_output_gradient():
    """``o.sum()`` hands the kernels a stride-0 ``do``: same gradients as a dense one."""
    q, k, v = make_inputs(1, 20, 20, 2, 1, 16, 16)
    o, _ = range_attention(q, k, v, stride=1, offset=0, window=6, scale=SCALE)
    expanded = torch.autograd.grad(o.sum(), (q, k, v), retain_graph=True)
    dense = torch.autograd.grad(o, (q, k, v), torch.ones_like(o).contiguous())
    for a, b in zip(expanded, dense, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("heads", "kwargs"),
    [
        (3, {"stride": 1, "offset": 0, "window": 4}),
        (4, {"stride": 0, "offset": 0, "window": 4}),
        (4, {"stride": 1, "offset": -1, "window": 4}),
        (4, {"stride": 1, "offset": 0, "window": 0}),
    ],
    ids=["gqa-split", "stride", "offset", "window"],
)
def test_rejects_bad_arguments(heads, kwargs):
    q, k, v = make_inputs(1, 4, 4, heads, 2, 16, 16)
    with pytest.raises(ValueError):
        range_attention(q, k, v, scale=SCALE, **kwargs)


@pytest.mark.skipif(DEVICE != "cuda", reason="bf16 and fp16 tl.dot need a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "kwargs",
    [{"stride": 1, "offset": 0, "window": 96}, {"stride": 8, "offset": 15, "window": None}],
    ids=["window", "compression"],
)
def test_half_precision_on_gpu(dtype, kwargs):
    """Realistic head dims (192/128) in half precision, against float64 on the same inputs."""
    torch.manual_seed(0)
    t_len = 300
    s_len = t_len if kwargs["stride"] == 1 else (t_len - 16) // 8 + 1
    q, k, v = (x.detach() for x in make_inputs(2, t_len, s_len, 8, 2, 192, 128))
    half = [x.to(dtype).requires_grad_() for x in (q, k, v)]
    o, _ = range_attention(*half, scale=192**-0.5, **kwargs)
    grad_out = torch.randn_like(o)
    grads = torch.autograd.grad(o, half, grad_out)
    full = [x.detach().double().requires_grad_() for x in half]
    if kwargs["stride"] == 1:
        ref = sliding_window_attention(*full, kwargs["window"], 192**-0.5)
    else:
        ref = compression_attention(*full, 16, 8, 192**-0.5)[0]
    ref_grads = torch.autograd.grad(ref, full, grad_out.double())
    for name, out, expected in zip(
        ("o", "dq", "dk", "dv"), (o, *grads), (ref, *ref_grads), strict=True
    ):
        assert out.dtype == dtype
        assert torch.isfinite(out).all(), name
        err = (out.double() - expected).norm() / expected.norm()
        assert err < 2e-2, f"{name}: error {err:.2e}"


@pytest.mark.parametrize("accumulate", [False, True], ids=["write", "accumulate"])
@pytest.mark.parametrize(
    ("t_len", "s_len", "keys"),
    [
        (37, 37, {"stride": 1, "offset": 0, "window": 9}),
        (37, 8, {"stride": 4, "offset": 7, "window": None}),
        (6, 0, {"stride": 4, "offset": 7, "window": None}),
    ],
    ids=["window", "compression", "no-key"],
)
def test_gated_backward_is_the_gradient_of_gate_times_o(t_len, s_len, keys, accumulate):
    """The fused NSA backward's entry point: from the ungated ``do`` and a gate (both
    signs, a strided view), ``dk, dv`` and the ``dq`` of ``gate * o``, written over a NaN
    ``dq`` or added to what ``dq`` holds."""
    torch.manual_seed(t_len + s_len)
    q, k, v = make_inputs(2, t_len, s_len, 3, 1, 16, 24)
    o, lse = range_attention(q, k, v, scale=SCALE, **keys)
    gate = torch.randn(2, t_len, 3, 2, device=DEVICE)[..., 1]
    do = torch.randn_like(o)
    want = torch.autograd.grad(o, (q, k, v), gate[..., None] * do)
    base = torch.randn_like(q) if accumulate else torch.full_like(q, math.nan)
    dq = base.clone()
    dk, dv = range_attention_backward(
        *(x.detach() for x in (q, k, v, o)), lse, do, dq,
        scale=SCALE, gate=gate, accumulate=accumulate, **keys,
    )  # fmt: skip
    got_dq = dq - base if accumulate else dq
    for name, got, ref in zip(("dq", "dk", "dv"), (got_dq, dk, dv), want, strict=True):
        assert_close(got, ref.double(), name)
