"""``nsa-lab bench train``: end-to-end training steps per attention variant, on one GPU.

What a researcher pays per variant: forward, backward and the AdamW step of the whole
model (projections, ``phi``, gates, norms, MLPs and the loss included), in bf16
autocast, measured as the median of ``steps`` timed steps after ``warmup`` untimed
ones. Beside it: tokens/s, MFU (the model FLOPs of ``nsa_lab.models.flops`` over the
GPU's bf16 peak), the peak GPU memory, and the time from building the model to the end
of the first step, which is where compilation and autotuning show.

Every (variant, length) runs in a fresh process, so that its first step pays its own
kernel compilation and autotuning: in one process a later variant would find the
kernels an earlier one tuned (Triton's on-disk caches are shared either way, as they
are between the runs of a sweep).
"""

from __future__ import annotations

import multiprocessing
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import torch
from omegaconf import DictConfig

# The small-model research shape (experiments/long_context.yaml): 6 layers, d_model 512,
# 8 query heads in 2 groups of 64, NSA with the paper's blocks.
RESEARCH_MODEL = (
    "model.n_layers=6",
    "model.d_model=512",
    "model.n_heads=8",
    "model.n_kv_heads=2",
    "model.head_dim=64",
    "attn.l=32",
    "attn.d=16",
    "attn.l_sel=64",
    "attn.n=16",
    "attn.w=512",
)
VOCAB_SIZE = 257  # the byte tokenizer's


@dataclass(frozen=True)
class StepBench:
    """How one (variant, length) is measured."""

    variant: str
    seq_len: int
    batch: int
    steps: int
    warmup: int
    compile_mode: str | None  # torch.compile's mode; None: eager
    overrides: tuple[str, ...] = ()
    device: str = "cuda"
    profile: bool = False


@dataclass(frozen=True)
class StepResult:
    bench: StepBench
    params: int
    ms_per_step: float
    tokens_per_s: float
    mfu: float | None
    peak_gib: float | None
    first_step_s: float
    profile: str | None = None


def bench_config(variant: str, seq_len: int, overrides: Sequence[str] = ()) -> DictConfig:
    """The benchmarked model's config: the research shape, ``overrides``, the variant and
    the length (raises ``ConfigError`` for a bad combination)."""
    from nsa_lab.config import load_config

    return load_config(
        overrides=[
            *RESEARCH_MODEL,
            *overrides,
            f"attn.name={variant}",
            f"model.max_seq_len={seq_len}",
            f"data.seq_len={seq_len}",
        ]
    )


def measure(bench: StepBench) -> StepResult:
    """Build the model, train ``warmup + steps`` steps on random tokens, and time them."""
    from nsa_lab.models import GQATransformer
    from nsa_lab.models.flops import training_flops_per_token
    from nsa_lab.training.efficiency import GIB, compile_model, device_peak_flops
    from nsa_lab.training.module import adamw, next_token_loss, optimizer_groups

    start = time.perf_counter()
    device = torch.device(bench.device)
    cfg = bench_config(bench.variant, bench.seq_len, bench.overrides)
    torch.manual_seed(0)
    model = GQATransformer(cfg.model, cfg.attn, VOCAB_SIZE).to(device)
    if bench.compile_mode is not None:
        compile_model(model, mode=bench.compile_mode)
    # AdamW as `nsa-lab train` runs it under bf16 autocast.
    groups = optimizer_groups(model, cfg.train.weight_decay)
    optimizer = adamw(groups, "bf16-mixed", lr=1e-4)
    tokens = torch.randint(0, VOCAB_SIZE, (bench.batch, bench.seq_len + 1), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> None:
        with autocast:
            logits = model(tokens[:, :-1])
        next_token_loss(logits, tokens[:, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times: list[float] = []
    last = start
    for i in range(bench.warmup + bench.steps):
        step()
        _synchronize(device)
        now = time.perf_counter()
        if i == 0:
            first_step_s = now - start
        elif i >= bench.warmup:
            times.append(now - last)
        last = now
    profile = _profile(step, bench.variant) if bench.profile else None
    ms = 1000 * statistics.median(times)
    tokens_per_s = bench.batch * bench.seq_len / ms * 1000
    peak = device_peak_flops(device)
    flops = training_flops_per_token(model, cfg.attn, bench.seq_len)
    return StepResult(
        bench=bench,
        params=model.num_params(),
        ms_per_step=ms,
        tokens_per_s=tokens_per_s,
        mfu=None if peak is None else flops * tokens_per_s / peak,
        peak_gib=torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None,
        first_step_s=first_step_s,
        profile=profile,
    )


def _profile(step: Callable[[], None], variant: str, steps: int = 3, rows: int = 25) -> str:
    """torch.profiler over ``steps`` more steps: the kernels by GPU time, per step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    kernels = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    table = events.table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=70)
    return f"profile of {variant}, {steps} steps, {kernels / steps:.0f} GPU ops per step:\n{table}"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_in_fresh_process(bench: StepBench) -> StepResult:
    """:func:`measure` in a spawned process of its own (module doc: why)."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(measure, bench).result()


def train_table(results: Sequence[StepResult]) -> list[str]:
    """Markdown rows; ``vs full`` compares tokens/s with ``full`` at the same length."""
    full = {r.bench.seq_len: r.tokens_per_s for r in results if r.bench.variant == "full"}
    rows = [
        "| variant | T | batch | params | ms/step | tokens/s | vs full | MFU | peak GiB "
        "| first step s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ratio = r.tokens_per_s / full[r.bench.seq_len] if r.bench.seq_len in full else None
        rows.append(
            f"| {r.bench.variant} | {kilo(r.bench.seq_len)} | {r.bench.batch} "
            f"| {r.params / 1e6:.1f}M | {r.ms_per_step:.1f} | {r.tokens_per_s:,.0f} "
            f"| {_maybe(ratio, '.2f')} | {_maybe(r.mfu, '.1%')} | {_maybe(r.peak_gib, '.2f')} "
            f"| {r.first_step_s:.1f} |"
        )
    return rows


def kilo(n: int) -> str:
    """``8192 -> '8k'``; lengths that are not whole kibi-tokens as they are."""
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def _maybe(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def run_train_bench(
    lengths: Sequence[int],
    variants: Sequence[str],
    *,
    batch: int,
    steps: int,
    warmup: int,
    compile_mode: str | None,
    overrides: Sequence[str] = (),
    device: str = "cuda",
    profile: bool = False,
) -> str:
    """The ``nsa-lab bench train`` report as markdown, rows printed as they finish."""
    model = dict(o.split("=", 1) for o in (*RESEARCH_MODEL, *overrides))  # later ones win
    header = (
        f"Training steps: {', '.join(f'{k}={v}' for k, v in model.items())}; "
        f"vocabulary {VOCAB_SIZE}, "
        f"bf16 autocast on a GPU, AdamW, compile={compile_mode or 'off'}; median of {steps} "
        f"steps after {warmup}; each row in a fresh process. Device: {_device_name(device)}."
    )
    print(header, flush=True)
    results = []
    for t_len in lengths:
        for variant in variants:
            bench = StepBench(
                variant,
                t_len,
                batch,
                steps,
                warmup,
                compile_mode,
                tuple(overrides),
                device,
                profile,
            )
            results.append(measure_in_fresh_process(bench))
            print(train_table(results)[-1], flush=True)
    profiles = [r.profile for r in results if r.profile]
    return "\n".join([header, "", *train_table(results), *("\n" + p for p in profiles)])


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"{device}, torch {torch.__version__}"
