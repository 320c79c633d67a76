"""Autotune candidates shared by the Triton kernels.

On a GPU the autotuner times every candidate once per shape class and keeps the
fastest. Under Triton's CPU interpreter (the CI) timings mean nothing and every
candidate would rerun the kernel in Python, so a single one stands in: small tiles,
which also cross more tile boundaries in tiny tests. ``NSA_LAB_AUTOTUNE=0`` keeps only
the first GPU candidate: correctness tests at many small shapes would otherwise spend
minutes compiling candidates whose speed they never use.
"""

from __future__ import annotations

import os

import triton

Candidate = tuple[dict[str, int], int, int]  # (compile-time tile sizes, num_warps, num_stages)


def interpreted() -> bool:
    """Whether the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def autotune_configs(candidates: list[Candidate], interpreter: Candidate) -> list[triton.Config]:
    """``candidates`` as autotune configs on a GPU; only ``interpreter`` under the interpreter."""
    if interpreted():
        chosen = [interpreter]
    elif os.environ.get("NSA_LAB_AUTOTUNE") == "0":
        chosen = candidates[:1]
    else:
        chosen = candidates
    return [
        triton.Config(meta, num_warps=warps, num_stages=stages) for meta, warps, stages in chosen
    ]
