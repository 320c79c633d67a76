"""Compile every Triton kernel of NSA's training op for Hopper (sm_90) without a GPU, and
report each compiled variant's registers and spill stack.

CI has no GPU: Triton's interpreter checks what the kernels compute, not that they
compile for a GPU nor that they fit its registers (a spill is local-memory traffic in
the inner loop). This script stands an sm_90 target in for the GPU driver, makes every
kernel launch compile (through ptxas, to a cubin) instead of running, has each
autotuner compile all of its candidates instead of timing them, and runs one forward
and backward of ``nsa_attention_triton`` on CPU tensors. ``cuobjdump -res-usage`` (in
Triton's wheel) then reads each cubin. Registers above 255 spill to the stack column::

    python scripts/sm90_compile_report.py --shape paper
    python scripts/sm90_compile_report.py --shape research --length 4096

The compiler is the Triton installed here; the GPU machine may run another version.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # before Triton reads it

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from nsa_lab.benchmarks.kernels import PAPER_PARAMS, PAPER_SHAPE, Shape  # noqa: E402
from nsa_lab.kernels.nsa.triton_ops import nsa_attention_triton  # noqa: E402

SHAPES = {"paper": PAPER_SHAPE, "research": Shape("research (8 heads, 2 groups, d=64)", 8, 2, 64)}
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


class Sm90Target:
    """What Triton asks of a driver to compile: a device, a stream and the target."""

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


def compile_only() -> list[tuple[str, str, object]]:
    """From now on in this process every launch compiles and does not run; returns the
    list that collects the compiled kernels as ``(name, compile-time options, kernel)``."""
    compiled: list[tuple[str, str, object]] = []
    run = JITFunction.run

    def compile_launch(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((self.__name__, _options(kwargs), kernel))
        return kernel

    def compile_candidates(self, *args, warmup=False, **kwargs):
        self.nargs = dict(zip(self.arg_names, args, strict=False))
        configs = self.prune_configs(kwargs) if len(self.configs) > 1 else self.configs
        for config in configs:
            self.fn.run(*args, **kwargs, **config.all_kwargs(), warmup=True)

    driver.set_active(Sm90Target())
    JITFunction.run, Autotuner.run = compile_launch, compile_candidates
    return compiled


def _options(kwargs: dict) -> str:
    """The launch's compile-time choices (upper-case constexprs, warps, stages)."""
    keep = {k: v for k, v in kwargs.items() if k.isupper() or k in ("num_warps", "num_stages")}
    return " ".join(f"{k}={v}" for k, v in sorted(keep.items()))


def resource_usage(cubin: bytes) -> tuple[int, int]:
    """``(registers, stack bytes)`` per thread of a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [str(CUOBJDUMP), "-res-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    return int(re.search(r"REG:(\d+)", text)[1]), int(re.search(r"STACK:(\d+)", text)[1])


def compile_report(shape: Shape, length: int) -> list[str]:
    """Markdown rows: one per distinct compiled kernel variant of one NSA training call."""
    g, d, params = shape.n_kv_heads, shape.head_dim, PAPER_PARAMS
    n_cmp = max(0, (length - params.l) // params.d + 1)

    def leaf(*size: int) -> torch.Tensor:
        return torch.zeros(*size, dtype=torch.bfloat16, requires_grad=True)

    kv = {
        "kc": leaf(1, n_cmp, g, d),
        "vc": leaf(1, n_cmp, g, d),
        **{name: leaf(1, length, g, d) for name in ("k_slc", "v_slc", "k_win", "v_win")},
    }
    compiled = compile_only()
    out = nsa_attention_triton(
        leaf(1, length, shape.n_heads, d), leaf(1, length, shape.n_heads, 3), params, **kv
    )
    out.backward(torch.zeros_like(out))
    rows, seen = ["| kernel | registers | stack B | options |", "|---|---|---|---|"], set()
    for name, options, kernel in compiled:
        if (name, options) in seen:
            continue
        seen.add((name, options))
        regs, stack = resource_usage(kernel.asm["cubin"])
        rows.append(f"| {name} | {regs} | {stack} | {options} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="paper")
    parser.add_argument("--length", type=int, default=4096, help="tokens (the tuning key)")
    ns = parser.parse_args()
    print(f"sm_90, Triton {triton.__version__}, {SHAPES[ns.shape].name}, T={ns.length}")
    print("\n".join(compile_report(SHAPES[ns.shape], ns.length)))


if __name__ == "__main__":
    main()
