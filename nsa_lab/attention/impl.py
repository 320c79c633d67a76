"""Which implementation of an attention op runs: ``attn.impl`` mapped to code, in one place.

Variants that have both a PyTorch op (runs anywhere, defines the function) and a
Triton twin (fast on a GPU) get their op from :func:`op_for`, so that ``auto``,
``torch`` and ``triton`` mean the same for every variant: ``auto`` picks per call
(the Triton kernels for CUDA tensors, PyTorch otherwise; the model is built on the
CPU and moved to the GPU afterwards), ``triton`` insists, ``torch`` never uses them.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from typing import Any

import torch

from nsa_lab.errors import ConfigError

Op = Callable[..., torch.Tensor]
TRITON_OPS_MODULE = "nsa_lab.kernels.nsa.triton_ops"


def triton_runnable() -> bool:
    """Whether the Triton kernels can run here: a CUDA GPU, or Triton's CPU interpreter."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    return (torch.cuda.is_available() or interpreted) and importlib.util.find_spec(
        "triton"
    ) is not None


def auto_impl(device: torch.device) -> str:
    """What ``attn.impl=auto`` runs on ``device``: ``triton`` on CUDA, ``torch`` elsewhere."""
    return "triton" if device.type == "cuda" else "torch"


def op_for(impl: str, torch_op: Op, triton_name: str) -> Op:
    """The op behind ``attn.impl``: ``torch_op`` or ``triton_ops.<triton_name>``.

    The Triton module is imported only where the kernels can run (:func:`triton_runnable`),
    so that machines without triton (or a GPU) never import it.
    """
    if impl == "torch":
        return torch_op
    if impl == "triton":
        if not triton_runnable():
            raise ConfigError(
                "attn.impl",
                impl,
                "the Triton kernels need a CUDA GPU (or TRITON_INTERPRET=1) and the triton "
                "package, and this machine has none; use attn.impl=torch or auto",
            )
        return _triton_op(triton_name)

    # Resolved now, not per call, so that torch.compile traces a plain function call.
    triton_op = _triton_op(triton_name) if triton_runnable() else torch_op

    def auto_op(q: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        op = triton_op if auto_impl(q.device) == "triton" else torch_op
        return op(q, *args, **kwargs)

    return auto_op


def _triton_op(name: str) -> Op:
    return getattr(importlib.import_module(TRITON_OPS_MODULE), name)
