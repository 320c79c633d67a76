"""Autotuning shared by the Triton kernels: candidates, pruning by head size, a disk cache.

On a GPU the autotuner times every candidate once per shape class and keeps the
fastest; each candidate is a compilation first, so the candidate lists decide how long
a run waits for its first step. Three things keep that short:

- ``small_head`` candidates: for head dims up to :data:`SMALL_HEAD_DIM` (the small
  models of long-context studies) a kernel may name the few tiles that won there, and
  only those are compiled and timed;
- ``cache_results``: the winner of every shape class is stored in Triton's on-disk
  cache, so later processes on the machine (sweep trials, resumed runs, DDP ranks)
  skip the timing; compiled kernels are cached there anyway;
- ``NSA_LAB_AUTOTUNE=0`` keeps only the first candidate: correctness tests at many
  small shapes would otherwise compile candidates whose speed they never use.

Under Triton's CPU interpreter (the CI) timings mean nothing and every candidate would
rerun the kernel in Python, so a single one stands in: small tiles, which also cross
more tile boundaries in tiny tests.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import triton

Candidate = tuple[dict[str, int], int, int]  # (compile-time tile sizes, num_warps, num_stages)
# Head dims up to this use a kernel's ``small_head`` candidates, when it has them.
SMALL_HEAD_DIM = 64


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s ``input_precision`` for inputs of ``dtype``: float32 inputs get true
    fp32 products (``ieee``; Triton would round them to TF32, a 1e-3 relative error that
    the float32 reference paths do not have); half-precision inputs ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"


def interpreted() -> bool:
    """Whether the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def autotune(
    candidates: Sequence[Candidate],
    interpreter: Candidate,
    key: list[str],
    *,
    small_head: Sequence[Candidate] = (),
    head_dim_arg: str = "D_K",
    **options: Any,
) -> Callable:
    """``triton.autotune`` over ``candidates`` (module doc), results cached on disk.

    ``small_head``: the candidates for kernels launched with ``head_dim_arg <=``
    :data:`SMALL_HEAD_DIM`; ``head_dim_arg`` must be part of ``key`` so that each head
    size is tuned on its own. ``options`` go to ``triton.autotune`` (``reset_to_zero``).
    """
    if small_head and head_dim_arg not in key:
        raise ValueError(f"head_dim_arg {head_dim_arg!r} must be in the tuning key {key}")
    large = _chosen(candidates, interpreter)
    small = _chosen(small_head, interpreter) if small_head else large
    if small is not large:
        options["prune_configs_by"] = {
            "early_config_prune": _by_head_dim(small, large, head_dim_arg)
        }
    return triton.autotune(
        configs=_unique([*small, *large]), key=key, cache_results=True, **options
    )


def _chosen(candidates: Sequence[Candidate], interpreter: Candidate) -> list[triton.Config]:
    if interpreted():
        chosen = [interpreter]
    elif os.environ.get("NSA_LAB_AUTOTUNE") == "0":
        chosen = list(candidates[:1])
    else:
        chosen = list(candidates)
    return [
        triton.Config(meta, num_warps=warps, num_stages=stages) for meta, warps, stages in chosen
    ]


def _unique(configs: list[triton.Config]) -> list[triton.Config]:
    seen: dict[str, triton.Config] = {}
    for config in configs:
        seen.setdefault(str(config), config)
    return list(seen.values())


def _by_head_dim(
    small: list[triton.Config], large: list[triton.Config], head_dim_arg: str
) -> Callable[..., list[triton.Config]]:
    """An ``early_config_prune`` hook: the candidates of the launch's head size."""
    small_keys = {str(c) for c in small}
    large_keys = {str(c) for c in large}

    def prune(configs: list[triton.Config], named_args: dict, **kwargs: Any) -> list:
        head_dim = {**named_args, **kwargs}[head_dim_arg]
        wanted = small_keys if head_dim <= SMALL_HEAD_DIM else large_keys
        return [c for c in configs if str(c) in wanted]

    return prune
