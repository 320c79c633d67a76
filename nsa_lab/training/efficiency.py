"""Efficiency settings of a run: ``train.compile``, peak FLOP/s of the GPU, and MFU.

``train.compile`` compiles every transformer block in place (``nn.Module.compile``, so
checkpoints keep their parameter names) and leaves one thing eager in every variant:
the attention op itself (``attend_kv`` of single-K/V variants, ``nsa_op`` of NSA).
Around it, projections, RoPE, gates, ``phi``, norms and the MLP compile for every
registered variant, so all variants get the same treatment.

Why the op stays eager, measured on one H200 with torch 2.11: Inductor fails to compile
the Triton NSA and window kernels that Dynamo traces into (a loop-carried accumulator
that turns fp64), and full attention's compiled SDPA step was slower than eager. What
compiling buys, same GPU, the issue's 6-layer d_model-512 model at 8192 tokens, batch
2, bf16, ms per training step eager -> compiled: nsa 91 -> 60, nsa_shared_kv 65 -> 52,
full 28 -> 63, window 19 -> 60. NSA's many small PyTorch ops fuse; full and window lose,
because at this size the compiled step is bound by host-side overhead (a profile of
full: GPU time 18.7 -> 13.8 ms, host time doubled). Compile all variants of a
comparison or none.
"""

from __future__ import annotations

import torch
from torch import nn

from nsa_lab.attention.base import AttentionBase, SingleKVAttention
from nsa_lab.attention.nsa import NSAAttention
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


def compile_blocks(blocks: nn.ModuleList, backend: str = "inductor") -> None:
    """Compile each block in place, its attention op left eager (see module doc).

    ``backend`` is torch.compile's; tests use ``aot_eager`` (the same graph capture,
    forward and backward, without Inductor's code generation, which takes about a
    minute on a small CPU).
    """
    for block in blocks:
        for attn in (m for m in block.modules() if isinstance(m, AttentionBase)):
            _keep_attention_op_eager(attn)
        block.compile(backend=backend)


def _keep_attention_op_eager(attn: AttentionBase) -> None:
    if isinstance(attn, NSAAttention):
        attn.nsa_op = torch.compiler.disable(attn.nsa_op)
    elif isinstance(attn, SingleKVAttention):
        attn.attend_kv = torch.compiler.disable(attn.attend_kv)
    else:
        attn.attend = torch.compiler.disable(attn.attend)
