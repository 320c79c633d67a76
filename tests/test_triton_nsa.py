"""The Triton NSA path end to end: every branch subset against the loop reference, and
the NSA and window layers with ``attn.impl=triton`` against ``attn.impl=torch`` (phi and
gates included).

Runs on the GPU when there is one, else under Triton's CPU interpreter.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from nsa_lab.attention import build_attention  # noqa: E402
from nsa_lab.attention.rope import rope_tables  # noqa: E402
from nsa_lab.config import load_config  # noqa: E402
from nsa_lab.kernels.nsa.naive import nsa_reference  # noqa: E402
from nsa_lab.kernels.nsa.spec import BRANCHES, NSAParams, combine_branches  # noqa: E402
from nsa_lab.kernels.nsa.triton_gates import gate_grads_triton, gated_sum_triton  # noqa: E402
from nsa_lab.kernels.nsa.triton_ops import nsa_attention_triton  # noqa: E402
from tests.conftest import assert_no_host_sync  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# float32 dots are true fp32 everywhere (triton_tuning.dot_precision); the GPU bound dates from
# when they were TF32 there and has not been re-checked tighter on a GPU.
TOL = 5e-3 if DEVICE == "cuda" else 1e-3
SUBSETS = [c for r in (1, 2, 3) for c in itertools.combinations(BRANCHES, r)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all(), "NaN or inf in the Triton result"
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()


def random_inputs(t_len: int, h: int, g: int, dk: int, dv: int, params: NSAParams) -> dict:
    n_cmp = max(0, (t_len - params.l) // params.d + 1)
    shapes = {
        "q": (2, t_len, h, dk),
        "gates": (2, t_len, h, len(params.branches)),
        "kc": (2, n_cmp, g, dk),
        "vc": (2, n_cmp, g, dv),
        "k_slc": (2, t_len, g, dk),
        "v_slc": (2, t_len, g, dv),
        "k_win": (2, t_len, g, dk),
        "v_win": (2, t_len, g, dv),
    }
    return {k: torch.randn(*s, device=DEVICE).requires_grad_() for k, s in shapes.items()}


@pytest.mark.parametrize("branches", SUBSETS, ids=["+".join(s) for s in SUBSETS])
@pytest.mark.parametrize(
    ("t_len", "h", "g", "dk", "dv"),
    [(37, 4, 2, 32, 16), (21, 3, 1, 16, 16), (6, 2, 2, 16, 16)],
    ids=["T37-gqa2-dk!=dv", "T21-gqa3", "T6-no-cmp-block"],
)
def test_triton_nsa_matches_the_reference(branches, t_len, h, g, dk, dv):
    torch.manual_seed(hash((branches, t_len)) % 2**31)
    params = NSAParams(l=8, d=4, l_sel=8, n=3, w=9, branches=branches)
    inputs = random_inputs(t_len, h, g, dk, dv, params)
    leaves = list(inputs.values())
    out = nsa_attention_triton(inputs["q"], inputs["gates"], params, **_tensors(inputs))
    doubles = {k: v.detach().double().requires_grad_() for k, v in inputs.items()}
    ref = nsa_reference(doubles["q"], doubles["gates"], params, **_tensors(doubles))
    assert rel_err(out, ref) < TOL
    grad = torch.randn_like(ref)
    grads = torch.autograd.grad(out, leaves, grad.float(), allow_unused=True)
    ref_grads = torch.autograd.grad(ref, list(doubles.values()), grad, allow_unused=True)
    for name, a, b in zip(inputs, grads, ref_grads, strict=True):
        if b is None or b.numel() == 0:
            continue
        assert a is not None, f"no gradient for {name}"
        assert rel_err(a, b) < TOL or b.abs().max() == 0, name


@pytest.mark.parametrize("branches", SUBSETS[2:5], ids=["+".join(s) for s in SUBSETS[2:5]])
def test_gated_sum_kernel_matches_combine_branches(branches):
    """The fused gate kernel on its own: strided gates, a ragged row count, head dim 24."""
    torch.manual_seed(len(branches))
    outputs = {
        name: torch.randn(2, 7, 3, 24, device=DEVICE, requires_grad=True) for name in branches
    }
    wide = torch.randn(2, 7, 3, len(branches) + 2, device=DEVICE, requires_grad=True)
    gates = wide[..., 1 : 1 + len(branches)]
    out = gated_sum_triton(outputs, gates, branches)
    ref = combine_branches(outputs, gates, branches)
    assert out.dtype == ref.dtype and rel_err(out, ref) < 1e-6
    grad = torch.randn_like(ref)
    leaves = [wide, *outputs.values()]
    got = torch.autograd.grad(out, leaves, grad)
    want = torch.autograd.grad(ref, leaves, grad)
    for a, b in zip(got, want, strict=True):
        assert rel_err(a, b) < 1e-6
    with pytest.raises(ValueError, match="columns"):
        gated_sum_triton(outputs, wide, branches)


def test_gate_grads_kernel_is_the_gate_part_of_the_gated_sum_backward():
    """What the fused NSA backward asks of the gate kernel: ``<do, o_c>`` per row, only."""
    torch.manual_seed(3)
    outputs = [torch.randn(2, 7, 3, 24, device=DEVICE) for _ in range(3)]
    gates = torch.randn(2, 7, 3, 3, device=DEVICE)
    do = torch.randn(2, 7, 3, 24, device=DEVICE)
    want = torch.stack([(do * o).sum(-1) for o in outputs], dim=-1)
    assert rel_err(gate_grads_triton(gates, outputs, do), want) < 1e-6


def test_nsa_output_is_one_autograd_node_over_its_inputs():
    """The branches and their gated sum are one node (``triton_ops._GatedBranches``):
    its backward feeds the leaves directly, so no branch's own ``g_c * do`` or ``dq``
    sits between them (the memory that used to put the 64k backward above dense)."""
    params = NSAParams(l=8, d=4, l_sel=8, n=3, w=9)
    inputs = random_inputs(21, 4, 2, 16, 16, params)
    out = nsa_attention_triton(inputs["q"], inputs["gates"], params, **_tensors(inputs))
    feeding = [fn for fn, _ in out.grad_fn.next_functions if fn is not None]
    assert len(feeding) == len(inputs)
    assert {type(fn).__name__ for fn in feeding} == {"AccumulateGrad"}


def _tensors(inputs: dict) -> dict:
    return {k: v for k, v in inputs.items() if k not in ("q", "gates")}


@pytest.mark.parametrize("name", ["nsa", "nsa_no_cmp", "nsa_shared_kv", "window"])
def test_layer_triton_matches_torch_including_phi_and_gate_grads(name):
    overrides = [
        f"attn.name={name}",
        "model.d_model=64",
        "model.n_heads=4",
        "model.n_kv_heads=2",
        "model.head_dim=16",
        "attn.l=8",
        "attn.d=4",
        "attn.l_sel=8",
        "attn.n=3",
        "attn.w=12",
    ]
    layers = {}
    for impl in ("torch", "triton"):
        torch.manual_seed(0)
        cfg = load_config(overrides=[*overrides, f"attn.impl={impl}"])
        layers[impl] = build_attention(cfg.model, cfg.attn).to(DEVICE)
    x = torch.randn(2, 45, 64, device=DEVICE)
    cos, sin = rope_tables(16, 45, 10000.0, x.device, x.dtype)
    outs = {impl: layer(x, cos, sin) for impl, layer in layers.items()}
    assert rel_err(outs["triton"], outs["torch"]) < TOL
    for out in outs.values():
        out.square().sum().backward()
    params = dict(layers["torch"].named_parameters())
    for pname, p in layers["triton"].named_parameters():
        ref = params[pname].grad
        if ref is None:
            assert p.grad is None, pname
            continue
        # Some grads are zero up to rounding (e.g. phi_K's output bias shifts every
        # compressed key alike, which the softmax ignores): judge those absolutely.
        assert rel_err(p.grad, ref) < TOL or (p.grad - ref).abs().max() < 1e-6, pname


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_graph_keeps_the_kernels_as_ops_and_their_results(backend):
    """Every Triton launch is a PyTorch custom op: torch.compile captures the whole NSA
    op in one graph (``fullgraph``: no break) and gives the eager values and gradients.
    Inductor (what ``train.compile`` uses) also rewrites the backward's ops that add
    into one ``dq`` buffer in place of their functional form, and must keep them right."""
    params = NSAParams(l=8, d=4, l_sel=8, n=3, w=16)
    torch.manual_seed(3)
    x = random_inputs(40, 4, 2, 16, 16, params)
    leaves = list(x.values())

    def loss(q: torch.Tensor, gates: torch.Tensor, kv: dict) -> torch.Tensor:
        return nsa_attention_triton(q * 2.0, gates, params, **kv).sin().sum()

    compiled = torch.compile(loss, backend=backend, fullgraph=True)
    kv = {k: v for k, v in x.items() if k not in ("q", "gates")}
    results = [fn(x["q"], x["gates"], kv) for fn in (loss, compiled)]
    grads = [torch.autograd.grad(r, leaves) for r in results]
    assert rel_err(results[1], results[0]) < 1e-6
    for eager, graph in zip(*grads, strict=True):
        assert rel_err(graph, eager) < 1e-6


@pytest.mark.skipif(DEVICE != "cuda", reason="host synchronisation is a GPU matter")
def test_forward_and_backward_never_wait_for_the_gpu():
    """No op of the NSA step reads a GPU value back to the host (a synchronisation stalls
    the launch queue every step, and breaks CUDA-graph capture); autotuning, which
    times candidates, runs first."""
    params = NSAParams(l=16, d=8, l_sel=16, n=4, w=64)
    x = random_inputs(300, 8, 2, 64, 64, params)
    bf16 = {k: v.detach().bfloat16().requires_grad_() for k, v in x.items()}

    def step() -> None:
        out = nsa_attention_triton(bf16["q"], bf16["gates"], params, **_tensors(bf16))
        out.float().square().sum().backward()

    assert_no_host_sync(step)
