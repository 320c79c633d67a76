"""Peak GPU memory and time of one needle cell, as ``eval needle`` and ``eval selection``
run it, at long contexts (GPU only; random weights: memory and time do not depend on them).

For each vocabulary size, variant and length: one cell of ``--trials`` needles answered
greedily through the KV caches (what ``eval needle`` does: one prefill, then a cached
step per answer token), and for NSA the selection diagnosis of the cell.
Prints a markdown table. The model is the issue-13 one: 6 layers, d_model 512, 8 query
heads in 2 groups of head_dim 64, NSA blocks l=32, d=16, l'=64, n=16, w=512.

    python3 scripts/needle_memory.py --lengths 2048,4096,8192,16384 --vocab 257,4096
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch

from nsa_lab.benchmarks.training import RESEARCH_MODEL
from nsa_lab.config import load_config, parse_lengths
from nsa_lab.evaluation.needle import cell_needles, greedy_answers, make_grid, rows_per_batch
from nsa_lab.evaluation.selection import diagnose_cell, reference_op, selecting_layers
from nsa_lab.models import GQATransformer

MODEL = list(RESEARCH_MODEL)  # the issue-13 model, as `nsa-lab bench train` runs it
DEPTH = 0.5


def measured(work: Callable[[], object]) -> tuple[float, float]:
    """Seconds and peak GiB allocated beyond what was allocated before, second of two runs
    (the first compiles and autotunes the Triton kernels)."""
    for _ in range(2):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        started = time.perf_counter()
        work()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    return seconds, (torch.cuda.max_memory_allocated() - before) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="2048,4096,8192,16384")
    parser.add_argument("--vocab", default="257,4096")
    parser.add_argument("--variants", default="full,window,nsa")
    parser.add_argument("--trials", type=int, default=20)
    args = parser.parse_args()
    device = torch.device("cuda")
    lengths = parse_lengths(args.lengths)
    haystack = np.random.default_rng(0).integers(0, 256, 2 * max(lengths)).astype(np.int32)
    print(f"{torch.cuda.get_device_name()}, {args.trials} needles per cell, depth {DEPTH}\n")
    head = ["vocab", "variant", "length", "rows/pass", "needle s", "needle GiB"]
    head += ["selection s", "selection GiB"]
    print("| " + " | ".join(head) + " |\n" + "|---" * len(head) + "|")
    for vocab in map(int, args.vocab.split(",")):
        for variant in args.variants.split(","):
            for length in lengths:
                cfg = load_config(
                    overrides=[
                        *MODEL,
                        f"attn.name={variant}",
                        f"model.max_seq_len={length}",
                        f"data.seq_len={length}",
                    ]
                )
                torch.manual_seed(0)
                model = GQATransformer(cfg.model, cfg.attn, vocab).to(device).eval()
                prompts, _ = cell_needles(haystack, length, DEPTH, args.trials, seed=0)
                seconds, gib = measured(lambda m=model, p=prompts: greedy_answers(m, p, device))
                selection = "- | -"
                layers = selecting_layers(model)
                if layers:
                    grid = make_grid(length, length, [length], [DEPTH], args.trials)
                    with reference_op(layers):
                        sel_s, sel_gib = measured(
                            lambda m=model, ls=layers, n=length, g=grid: diagnose_cell(
                                m, ls, haystack, n, DEPTH, g, device
                            )
                        )
                    selection = f"{sel_s:.2f} | {sel_gib:.2f}"
                print(
                    f"| {vocab} | {variant} | {length} | {rows_per_batch(length)} | "
                    f"{seconds:.2f} | {gib:.2f} | {selection} |",
                    flush=True,
                )
                del model
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
