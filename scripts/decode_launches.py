"""Where one NSA decoding step's time goes, launch by launch (GPU only).

``nsa-lab bench decode`` times the whole step; this times it replayed from a CUDA graph
and lists each Triton launch's kernel time (``torch.profiler`` over ``--steps`` steps), at
the paper's attention shape (64 query heads, 4 KV groups, head_dim 128, bf16) and the
paper's NSA blocks. ``--busy-programs``, ``--min-split-keys`` and ``--score-chunk``
override the split plan of ``kernels/nsa/triton_decode.py`` (``BUSY_PROGRAMS``,
``MIN_SPLIT_KEYS``, ``SCORE_CHUNK``) for this process, to try another before editing it;
``--programmatic-launch`` chains the launches on Hopper (``PROGRAMMATIC_LAUNCH``, off by
default). Under programmatic launch a kernel's time includes its wait for the one before,
so only the graph step compares across that switch:

    python3 scripts/decode_launches.py --length 65536 --batch 1,8
    python3 scripts/decode_launches.py --length 65536 --batch 8 --busy-programs 528
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from nsa_lab.benchmarks.decode import PAPER_PARAMS, decode_inputs, step_times
from nsa_lab.kernels.nsa import triton_decode
from nsa_lab.kernels.nsa.triton_decode import nsa_decode_step_triton


def launch_times(batch: int, length: int, steps: int) -> tuple[float, dict[str, float]]:
    """The graph-replayed step (us) and each kernel's time per step (us), at position
    ``length - 1`` with full caches."""
    x = decode_inputs(batch, length, PAPER_PARAMS, "cuda")
    t = length - 1

    def step() -> torch.Tensor:
        return nsa_decode_step_triton(x.q, x.gates, PAPER_PARAMS, t, **x.caches)

    with torch.inference_mode():
        graph_us = 1000 * step_times(step).graph  # as `nsa-lab bench decode` times it
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                step()
            torch.cuda.synchronize()
    kernels = {
        event.key: event.self_device_time_total / steps
        for event in prof.key_averages()
        if event.device_type == torch.autograd.DeviceType.CUDA
    }
    return graph_us, kernels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=65536, help="context length")
    parser.add_argument("--batch", default="1,8", help="batch sizes, comma-separated")
    parser.add_argument("--steps", type=int, default=20, help="profiled steps")
    parser.add_argument("--busy-programs", type=int, help="override BUSY_PROGRAMS")
    parser.add_argument("--min-split-keys", type=int, help="override MIN_SPLIT_KEYS")
    parser.add_argument("--score-chunk", type=int, help="override SCORE_CHUNK")
    parser.add_argument("--programmatic-launch", action="store_true", help="PROGRAMMATIC_LAUNCH on")
    args = parser.parse_args()
    overrides = {
        "BUSY_PROGRAMS": args.busy_programs,
        "MIN_SPLIT_KEYS": args.min_split_keys,
        "SCORE_CHUNK": args.score_chunk,
        "PROGRAMMATIC_LAUNCH": True if args.programmatic_launch else None,
    }
    for name, value in overrides.items():
        if value is not None:
            setattr(triton_decode, name, value)
    plan = ", ".join(f"{name}={getattr(triton_decode, name)}" for name in overrides)
    print(
        f"{torch.cuda.get_device_name()}; {plan}; T={args.length}\n"
        "\n| batch | graph step us | launch | kernel us per step |\n|---|---|---|---|"
    )
    for batch in (int(b) for b in args.batch.split(",")):
        graph_us, kernels = launch_times(batch, args.length, args.steps)
        for name, us in kernels.items():
            print(f"| {batch} | {graph_us:.1f} | {name} | {us:.1f} |", flush=True)


if __name__ == "__main__":
    main()
