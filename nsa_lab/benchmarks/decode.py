"""``nsa-lab bench decode``: what one decoding step reads and costs, NSA against full attention.

Three tables per run:

- **keys loaded per step** per KV group, from the config alone: NSA's compressed blocks,
  ``n`` selected blocks of ``l'`` keys and the ``w`` window keys, beside full attention's
  ``T`` and the paper's Table 4 (which counts ``T/d`` compressed keys);
- **attention op step time** on a GPU (paper shape: 64 query heads, 4 KV groups, head
  dim 128, bf16): the Triton NSA decode step from KV caches against full attention's
  fastest SDPA backend for one query over the cache, same run, each both launched
  eagerly and replayed from a CUDA graph (:func:`step_times`);
- **whole-model generation** tokens/s (the small model of ``nsa-lab bench kernels``):
  a prefill, two untimed one-token steps, then ``steps`` timed ones ending at ``T``,
  and the bytes the KV caches hold per sequence.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from nsa_lab.benchmarks.kernels import DENSE_BACKENDS, PAPER_PARAMS, PAPER_SHAPE, SMALL_STEP_MODEL
from nsa_lab.benchmarks.training import VOCAB_SIZE, bench_config, kilo
from nsa_lab.kernels.nsa.spec import NSAParams
from nsa_lab.kernels.nsa.torch_decode import compressed_blocks_done

# The paper's Table 4: keys loaded per decoding step (NSA) at 8k, 16k, 32k and 64k.
PAPER_TABLE_4 = {8192: 2048, 16384: 2560, 32768: 3584, 65536: 5632}
MiB = 2**20
# Untimed decoding steps before the timed ones: the first compiles and tunes the kernels.
WARM_STEPS = 2


def nsa_keys_per_step(t_len: int, params: NSAParams) -> int:
    """Keys one NSA step reads per KV group with ``t_len`` tokens of context (query at
    ``t_len - 1``): every finished compressed block, the selected blocks (at most ``n``
    of the visible ones, ``l'`` keys each) and the window."""
    t = t_len - 1
    visible_blocks = t // params.l_sel + 1
    return (
        compressed_blocks_done(t, params.l, params.d)
        + min(params.n, visible_blocks) * params.l_sel
        + min(params.w, t_len)
    )


def paper_formula(t_len: int, params: NSAParams) -> int:
    """The paper's count: ``T/d + n l' + w``."""
    return t_len // params.d + params.n * params.l_sel + params.w


def keys_table(lengths: Sequence[int], params: NSAParams) -> list[str]:
    rows = [
        "| T | full | NSA (exact) | paper formula T/d + n l' + w | paper Table 4 | full / NSA |",
        "|---|---|---|---|---|---|",
    ]
    for t_len in lengths:
        nsa = nsa_keys_per_step(t_len, params)
        table = PAPER_TABLE_4.get(t_len)
        rows.append(
            f"| {kilo(t_len)} | {t_len} | {nsa} | {paper_formula(t_len, params)} "
            f"| {'-' if table is None else table} | {t_len / nsa:.1f}x |"
        )
    return rows


@dataclass(frozen=True)
class DecodeInputs:
    """One decoding step's query and the caches of a sequence with ``t_len`` tokens."""

    q: torch.Tensor  # [B, H, D]
    gates: torch.Tensor  # [B, H, 3]
    caches: dict[str, torch.Tensor]


def decode_inputs(batch: int, t_len: int, params: NSAParams, device: str) -> DecodeInputs:
    h, g, d = PAPER_SHAPE.n_heads, PAPER_SHAPE.n_kv_heads, PAPER_SHAPE.head_dim
    n_cmp = compressed_blocks_done(t_len - 1, params.l, params.d)

    def rand(*size: int) -> torch.Tensor:
        return torch.randn(*size, device=device, dtype=torch.bfloat16)

    k, v = rand(batch, t_len, g, d), rand(batch, t_len, g, d)
    first = max(0, t_len - params.w)
    return DecodeInputs(
        q=rand(batch, h, d),
        gates=torch.rand(batch, h, 3, device=device, dtype=torch.bfloat16),
        caches={
            "kc": rand(batch, n_cmp, g, d),
            "vc": rand(batch, n_cmp, g, d),
            "k_slc": k,
            "v_slc": v,
            "k_win": k[:, first:],
            "v_win": v[:, first:],
        },
    )


@dataclass(frozen=True)
class StepTimes:
    """Median milliseconds of one step, launched eagerly and replayed from a CUDA graph."""

    eager: float
    graph: float


def step_times(fn: Callable[[], object]) -> StepTimes:
    """Both timings of ``fn``. Eagerly each launch pays its host work (Python, the
    launchers); a CUDA graph replays the same kernels without it, as a serving loop
    over fixed-size caches does. The eager timing runs first, so autotuning is done
    before the graph is captured."""
    from triton.testing import do_bench, do_bench_cudagraph

    eager = do_bench(fn, warmup=25, rep=100, return_mode="median")
    return StepTimes(eager, do_bench_cudagraph(fn, rep=100, return_mode="median"))


def full_decode_times(x: DecodeInputs) -> tuple[str, StepTimes]:
    """The fastest SDPA backend for one query over the full cache (GQA, no key copies),
    by its graph-replayed time."""
    q = x.q[:, :, None]  # [B, H, 1, D]
    k, v = (x.caches[n].transpose(1, 2) for n in ("k_slc", "v_slc"))  # [B, G, T, D]
    best: tuple[str, StepTimes] | None = None
    for backend in (*DENSE_BACKENDS, SDPBackend.MATH):

        def step(backend: SDPBackend = backend) -> torch.Tensor:
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                times = step_times(step)
        except RuntimeError:  # backend unavailable for this shape, or not capturable
            continue
        if best is None or times.graph < best[1].graph:
            best = (backend.name.lower(), times)
    if best is None:
        raise RuntimeError("no SDPA backend ran")
    return best


def step_table(lengths: Sequence[int], batches: Sequence[int], params: NSAParams) -> list[str]:
    from nsa_lab.kernels.nsa.triton_decode import nsa_decode_step_triton

    rows = [
        "| T | batch | NSA ms (graph) | full ms (graph) | full / NSA (graph) "
        "| NSA ms (eager) | full ms (eager) | full / NSA (eager) | full backend |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t_len in lengths:
        for batch in batches:
            x = decode_inputs(batch, t_len, params, "cuda")
            t = t_len - 1
            with torch.inference_mode():
                nsa = step_times(
                    lambda x=x, t=t: nsa_decode_step_triton(x.q, x.gates, params, t, **x.caches)
                )
                backend, full = full_decode_times(x)
            rows.append(
                f"| {kilo(t_len)} | {batch} | {nsa.graph:.4f} | {full.graph:.4f} "
                f"| {full.graph / nsa.graph:.2f}x | {nsa.eager:.4f} | {full.eager:.4f} "
                f"| {full.eager / nsa.eager:.2f}x | {backend} |"
            )
            print(rows[-1], flush=True)
            del x
            torch.cuda.empty_cache()
    return rows


@dataclass(frozen=True)
class Generation:
    variant: str
    t_len: int
    batch: int
    tokens_per_s: float
    cache_mib_per_sequence: float


def generation_speed(
    variant: str,
    t_len: int,
    batch: int,
    steps: int,
    device: str,
    overrides: Sequence[str] = SMALL_STEP_MODEL,
) -> Generation:
    """Prefill random tokens, take :data:`WARM_STEPS` untimed cached steps (they compile
    and tune the decode kernels), then time ``steps`` one-token steps ending at ``t_len``."""
    from nsa_lab.models import GQATransformer

    cfg = bench_config(variant, t_len, overrides)
    torch.manual_seed(0)
    model = GQATransformer(cfg.model, cfg.attn, VOCAB_SIZE).to(device).eval()
    prompt = torch.randint(0, VOCAB_SIZE, (batch, t_len - steps - WARM_STEPS), device=device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")
    with torch.no_grad(), autocast:
        cache = model.new_cache(t_len, device, torch.float32)
        logits = model(prompt, last_positions=1, cache=cache)
        token = logits[:, -1].argmax(-1)
        for _ in range(WARM_STEPS):
            token = model(token[:, None], cache=cache)[:, -1].argmax(-1)
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            token = model(token[:, None], cache=cache)[:, -1].argmax(-1)
        _synchronize(device)
        seconds = time.perf_counter() - start
    return Generation(variant, t_len, batch, batch * steps / seconds, cache.nbytes() / batch / MiB)


def generation_table(results: Sequence[Generation]) -> list[str]:
    rows = [
        "| variant | T | batch | tokens/s | KV cache MiB per sequence |",
        "|---|---|---|---|---|",
    ]
    rows += [
        f"| {r.variant} | {kilo(r.t_len)} | {r.batch} | {r.tokens_per_s:,.1f} "
        f"| {r.cache_mib_per_sequence:.1f} |"
        for r in results
    ]
    return rows


def run_decode_bench(
    lengths: Sequence[int], batches: Sequence[int], steps: int = 64, device: str = "cuda"
) -> str:
    """The ``nsa-lab bench decode`` report as markdown (the step table needs a GPU)."""
    params = PAPER_PARAMS
    lines = [
        f"NSA l={params.l} d={params.d} l'={params.l_sel} n={params.n} w={params.w}. "
        "Keys loaded per decoding step, per KV group:",
        "",
        *keys_table(lengths, params),
        "",
    ]
    print("\n".join(lines), flush=True)
    if device == "cuda":
        lines += [
            f"Attention op, one decoding step ({PAPER_SHAPE.name}, bf16), "
            f"{torch.cuda.get_device_name()}:",
            "",
            *step_table(lengths, batches, params),
            "",
        ]
    results = []
    for t_len in lengths:
        for batch in batches:
            for variant in ("full", "nsa"):
                results.append(generation_speed(variant, t_len, batch, steps, device))
                print(generation_table(results)[-1], flush=True)
    lines += [
        f"Generation, small model ({', '.join(SMALL_STEP_MODEL)}), {steps} timed steps after a "
        f"prefill and {WARM_STEPS} untimed steps, device {device}:",
        "",
        *generation_table(results),
    ]
    return "\n".join(lines)


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
