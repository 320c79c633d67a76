"""Efficiency settings of a run: ``train.compile``, peak FLOP/s of the GPU, and MFU.

``train.compile`` compiles the whole model for every variant. The Triton kernels are
PyTorch custom ops (``torch.library.custom_op``), so torch.compile keeps each launch as
one opaque node and fuses everything around it (projections' casts, RoPE, ``phi``,
gates, norms, the MLP) without a graph break; dense attention's SDPA is compiled like
any other op. Figures: docs/benchmarks.md.
"""

from __future__ import annotations

import torch
from torch import nn

from nsa_lab.config import ConfigError

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s per GPU, by a part of the name
# torch.cuda.get_device_name reports; the first match wins, so variants come first.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10", 125e12),
)
GIB = 2**30


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of one GPU called ``device_name``; None when unknown."""
    return next((peak for part, peak in PEAK_BF16_FLOPS if part in device_name), None)


def device_peak_flops(device: torch.device) -> float | None:
    """:func:`peak_flops` of ``device``; None on a CPU (no MFU there)."""
    if device.type != "cuda":
        return None
    return peak_flops(torch.cuda.get_device_name(device))


def model_flops_utilization(
    flops_per_token: float, tokens_per_s: float, peak_per_device: float, devices: int
) -> float:
    """MFU: the model FLOP/s achieved over the peak of all ``devices`` together."""
    return flops_per_token * tokens_per_s / (peak_per_device * devices)


def check_compile(compile_model: bool, strategy: str) -> None:
    """Refuse what ``train.compile`` does not cover, before any work starts.

    FSDP flattens the parameters of the blocks it wraps, which in-place compiled blocks
    were not tested with; DDP and single-device runs are covered.
    """
    if compile_model and strategy == "fsdp":
        raise ConfigError(
            "train.compile",
            compile_model,
            "is not supported with train.strategy=fsdp; use ddp or train.compile=false",
        )


def compile_model(model: nn.Module, backend: str = "inductor", mode: str = "default") -> None:
    """Compile ``model`` in place (``nn.Module.compile``: parameter names, hence
    checkpoints, unchanged), with static shapes: a run sees few lengths (the curriculum's,
    the training length, evaluation prompts), each compiled once.

    ``backend`` is torch.compile's; tests use ``aot_eager`` (the same graph capture,
    forward and backward, without Inductor's code generation, which takes about a
    minute on a small CPU). ``mode`` is Inductor's (``nsa_lab.config.COMPILE_MODES``):
    ``reduce-overhead`` replays each compiled forward and backward as CUDA graphs, which
    removes the host's cost per launch (NSA's step launches about 1,400 GPU ops, more
    than the host issues in the time the GPU runs them; docs/benchmarks.md).
    """
    model.compile(backend=backend, dynamic=False, mode=mode if backend == "inductor" else None)
