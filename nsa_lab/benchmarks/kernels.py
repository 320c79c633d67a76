"""``nsa-lab bench``: NSA kernel and training-step speed against dense attention, on a GPU.

Every ratio compares numbers measured in the same run: NSA (Triton) against dense
causal ``F.scaled_dot_product_attention`` with the fastest SDPA backend that runs on
the GPU at hand. Times are medians of ``triton.testing.do_bench`` (CUDA events, L2
flushed between repetitions); memory is the peak allocated during one forward +
backward, above what the inputs already hold.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from nsa_lab.benchmarks.training import run_train_bench
from nsa_lab.kernels.nsa.spec import NSAParams
from nsa_lab.kernels.nsa.torch_ops import nsa_attention

GiB = 2**30
# The training-step line of the kernel report: wider than the research model, so that
# the attention's share of the step is that of the paper's ratios of heads to width.
SMALL_STEP_MODEL = (
    "model.n_layers=4",
    "model.d_model=1024",
    "model.n_heads=16",
    "model.n_kv_heads=2",
    "model.head_dim=64",
)
PAPER_PARAMS = NSAParams(l=32, d=16, l_sel=64, n=16, w=512)
DENSE_BACKENDS = (
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
)


@dataclass(frozen=True)
class Shape:
    name: str
    n_heads: int
    n_kv_heads: int
    head_dim: int


PAPER_SHAPE = Shape("paper (64 heads, 4 groups, d=128)", 64, 4, 128)
SMALL_SHAPE = Shape("small (16 heads, 2 groups, d=64)", 16, 2, 64)


@dataclass
class Timing:
    fwd_ms: float
    bwd_ms: float
    fwd_bwd_ms: float
    peak_gib: float


def nsa_inputs(shape: Shape, t_len: int, params: NSAParams, dtype: torch.dtype) -> dict:
    """Random projected tensors for one NSA call (batch 1), all requiring grad."""
    g, d = shape.n_kv_heads, shape.head_dim
    n_cmp = max(0, (t_len - params.l) // params.d + 1)

    def rand(*size: int) -> torch.Tensor:
        return torch.randn(*size, device="cuda", dtype=dtype).requires_grad_()

    return {
        "q": rand(1, t_len, shape.n_heads, d),
        "gates": torch.rand(
            1, t_len, shape.n_heads, 3, device="cuda", dtype=dtype
        ).requires_grad_(),
        "kc": rand(1, n_cmp, g, d),
        "vc": rand(1, n_cmp, g, d),
        "k_slc": rand(1, t_len, g, d),
        "v_slc": rand(1, t_len, g, d),
        "k_win": rand(1, t_len, g, d),
        "v_win": rand(1, t_len, g, d),
    }


def nsa_call(op: Callable, inputs: dict, params: NSAParams) -> Callable[[], torch.Tensor]:
    tensors = {k: v for k, v in inputs.items() if k not in ("q", "gates")}
    return lambda: op(inputs["q"], inputs["gates"], params, **tensors)


def dense_inputs(inputs: dict) -> dict:
    """q and the selection branch's k/v, the latter repeated to all query heads.

    PyTorch's fused SDPA kernels need as many key heads as query heads; a GQA model
    using them repeats its keys, so the baseline does too (outside the timed region).
    """
    hpg = inputs["q"].shape[2] // inputs["k_slc"].shape[2]
    return {
        "q": inputs["q"],
        "k": inputs["k_slc"].detach().repeat_interleave(hpg, dim=2).requires_grad_(),
        "v": inputs["v_slc"].detach().repeat_interleave(hpg, dim=2).requires_grad_(),
    }


def dense_call(inputs: dict, backend: SDPBackend) -> Callable[[], torch.Tensor]:
    """Dense causal attention through one SDPA backend, on :func:`dense_inputs`."""
    q, k, v = (inputs[n].transpose(1, 2) for n in ("q", "k", "v"))

    def run() -> torch.Tensor:
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return run


def _median_ms(fn: Callable[[], object]) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def time_fwd_bwd(fn: Callable[[], torch.Tensor], inputs: dict) -> Timing:
    """Forward, backward (on a retained graph) and forward + backward times, and peak memory."""
    leaves = [t for t in inputs.values() if t.requires_grad]
    out = fn()
    grad = torch.randn_like(out)
    fwd = _median_ms(fn)
    bwd = _median_ms(lambda: torch.autograd.grad(out, leaves, grad, retain_graph=True))
    both = _median_ms(lambda: torch.autograd.grad(fn(), leaves, grad))
    out = None  # free the retained graph before measuring peak memory
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    torch.autograd.grad(fn(), leaves, grad)
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / GiB
    return Timing(fwd, bwd, both, peak)


def fastest_dense(inputs: dict) -> tuple[str, Timing]:
    """The SDPA backend with the lowest forward + backward time, and its timing."""
    dense = dense_inputs(inputs)
    best: tuple[str, Timing] | None = None
    for backend in DENSE_BACKENDS:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                timing = time_fwd_bwd(dense_call(dense, backend), dense)
        except RuntimeError:  # backend unavailable for this shape/GPU
            continue
        if best is None or timing.fwd_bwd_ms < best[1].fwd_bwd_ms:
            best = (backend.name.lower(), timing)
    if best is None:
        raise RuntimeError("no SDPA backend ran")
    return best


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def correctness_line(shape: Shape, t_len: int, params: NSAParams) -> str:
    """Triton (bf16) and the PyTorch path (bf16) against the PyTorch path in fp32.

    All three see the same bf16-valued inputs; the fp32 run is the reference, so the
    Triton error can be read against the rounding the PyTorch path itself incurs.
    """
    from nsa_lab.kernels.nsa.triton_ops import nsa_attention_triton

    torch.manual_seed(0)
    inputs = nsa_inputs(shape, t_len, params, torch.bfloat16)
    fp32 = {k: v.detach().float().requires_grad_() for k, v in inputs.items()}
    runs = {}
    for name, op, tensors in (
        ("triton bf16", nsa_attention_triton, inputs),
        ("torch bf16", nsa_attention, inputs),
        ("torch fp32", nsa_attention, fp32),
    ):
        out = nsa_call(op, tensors, params)()
        grad_out = torch.ones_like(out)
        runs[name] = (out, torch.autograd.grad(out, list(tensors.values()), grad_out))
    ref_out, ref_grads = runs.pop("torch fp32")
    parts = []
    for name, (out, grads) in runs.items():
        worst = max(rel_error(a, b) for a, b in zip(grads, ref_grads, strict=True))
        parts.append(f"{name}: forward {rel_error(out, ref_out):.1e}, worst gradient {worst:.1e}")
    return (
        f"correctness at T={t_len}, {shape.name}: relative L2 error against the PyTorch "
        f"path in fp32 on the same inputs: " + "; ".join(parts)
    )


def kernel_table(lengths: Sequence[int], shapes: Sequence[Shape], params: NSAParams) -> list[str]:
    from nsa_lab.kernels.nsa.triton_ops import nsa_attention_triton

    header = (
        "| shape | T | NSA fwd ms | NSA bwd ms | NSA fwd+bwd ms | dense fwd ms | dense bwd ms "
        "| dense fwd+bwd ms | dense backend | fwd x | bwd x | fwd+bwd x | NSA peak GiB "
        "| dense peak GiB |"
    )
    rows = [header, "|" + "---|" * (header.count("|") - 1)]
    for shape in shapes:
        for t_len in lengths:
            torch.manual_seed(0)
            inputs = nsa_inputs(shape, t_len, params, torch.bfloat16)
            nsa = time_fwd_bwd(nsa_call(nsa_attention_triton, inputs, params), inputs)
            backend, dense = fastest_dense(inputs)
            rows.append(
                f"| {shape.name} | {t_len // 1024}k | {nsa.fwd_ms:.2f} | {nsa.bwd_ms:.2f} "
                f"| {nsa.fwd_bwd_ms:.2f} | {dense.fwd_ms:.2f} | {dense.bwd_ms:.2f} "
                f"| {dense.fwd_bwd_ms:.2f} | {backend} | {dense.fwd_ms / nsa.fwd_ms:.2f} "
                f"| {dense.bwd_ms / nsa.bwd_ms:.2f} | {dense.fwd_bwd_ms / nsa.fwd_bwd_ms:.2f} "
                f"| {nsa.peak_gib:.2f} | {dense.peak_gib:.2f} |"
            )
            print(rows[-1], flush=True)
            del inputs
            torch.cuda.empty_cache()
    return rows


def branch_breakdown(shape: Shape, t_len: int, params: NSAParams) -> list[str]:
    """Where NSA's time goes: each Triton stage timed on its own (fwd, bwd)."""
    from nsa_lab.kernels.nsa import triton_ops
    from nsa_lab.kernels.nsa.triton_selection import (
        select_blocks_triton,
        selection_attention_triton,
    )

    torch.manual_seed(0)
    x = nsa_inputs(shape, t_len, params, torch.bfloat16)
    scale = shape.head_dim**-0.5
    _, lse = triton_ops.compression_branch(x["q"], x["kc"], x["vc"], params, scale)

    def pick() -> torch.Tensor:
        return select_blocks_triton(
            x["q"].detach(),
            x["kc"].detach(),
            lse,
            l=params.l,
            d=params.d,
            l_sel=params.l_sel,
            n=params.n,
            force_init_local=True,
            scale=scale,
        )

    indices = pick()
    stages = {
        "cmp attention": (
            lambda: triton_ops.compression_branch(x["q"], x["kc"], x["vc"], params, scale)[0],
            {"q": x["q"], "kc": x["kc"], "vc": x["vc"]},
        ),
        "slc attention": (
            lambda: selection_attention_triton(
                x["q"], x["k_slc"], x["v_slc"], indices, l_sel=params.l_sel, scale=scale
            ),
            {"q": x["q"], "k": x["k_slc"], "v": x["v_slc"]},
        ),
        "win attention": (
            lambda: triton_ops.window_branch(x["q"], x["k_win"], x["v_win"], params, scale)[0],
            {"q": x["q"], "k": x["k_win"], "v": x["v_win"]},
        ),
    }
    rows = [f"| stage ({shape.name}, T={t_len // 1024}k) | fwd ms | bwd ms |", "|---|---|---|"]
    rows.append(f"| scores + top-n | {_median_ms(pick):.2f} | - |")
    for name, (fn, leaves) in stages.items():
        timing = time_fwd_bwd(fn, leaves)
        rows.append(f"| {name} | {timing.fwd_ms:.2f} | {timing.bwd_ms:.2f} |")
    for row in rows[-4:]:
        print(row, flush=True)
    return rows


def run_kernel_bench(lengths: Sequence[int], correctness_len: int = 4096) -> str:
    """The full ``nsa-lab bench kernels`` report as markdown."""
    if not torch.cuda.is_available():
        raise SystemExit("nsa-lab bench needs a CUDA GPU")
    lines = [
        f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
        f"NSA l={PAPER_PARAMS.l} d={PAPER_PARAMS.d} l_sel={PAPER_PARAMS.l_sel} "
        f"n={PAPER_PARAMS.n} w={PAPER_PARAMS.w}, batch 1, bf16",
        "",
        correctness_line(PAPER_SHAPE, correctness_len, PAPER_PARAMS),
        "",
    ]
    print("\n".join(lines), flush=True)
    lines += kernel_table(lengths, (PAPER_SHAPE, SMALL_SHAPE), PAPER_PARAMS)
    lines += ["", "Per-stage breakdown at the longest length:", ""]
    lines += branch_breakdown(PAPER_SHAPE, max(lengths), PAPER_PARAMS)
    lines += ["", "Training step, small model (4 layers, d_model 1024, 16 heads), batch 1:", ""]
    lines.append(
        run_train_bench(
            [16384],
            ("full", "nsa"),
            batch=1,
            steps=10,
            warmup=3,
            compile_mode=None,
            overrides=SMALL_STEP_MODEL,
        )
    )
    return "\n".join(lines)
