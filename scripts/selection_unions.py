"""Do neighbouring query positions select alike? A trained NSA model against its untrained twin.

The Triton selection kernels hold a few neighbouring positions per tile (with 4 heads per
group, 4 positions fill the 16 rows of a tensor-core product) and walk the union of their
chosen blocks, so their speed follows how much neighbours share: docs/benchmarks.md
(round four) measured 35.2 blocks per 4-position tile against 15.1 per position on the
untrained 8k bench model. This prints, per selecting layer, the blocks a position reads
and the mean union per tile of 1, 2, 4, 8 and 16 positions, for the run's model and for
a freshly initialised one of the same config, on windows of text (the builtin corpus by
default). CPU is enough:

    python3 scripts/selection_unions.py RUN_ID_OR_CHECKPOINT [--text FILE] [--windows 4]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from nsa_lab.data.corpus import builtin_documents
from nsa_lab.evaluation.generate import run_tokenizer
from nsa_lab.evaluation.loading import load_run
from nsa_lab.evaluation.selection import LayerSharing, selection_sharing
from nsa_lab.models import GQATransformer

TILE_SIZES = (1, 2, 4, 8, 16)


def windows(ids: torch.Tensor, seq_len: int, count: int) -> torch.Tensor:
    """``count`` windows of ``seq_len`` tokens spread evenly over ``ids``: ``[count, seq_len]``."""
    if len(ids) < seq_len:
        raise SystemExit(f"the text holds {len(ids)} tokens, fewer than seq_len={seq_len}")
    starts = torch.linspace(0, len(ids) - seq_len, count).long()
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def table_rows(name: str, layers: list[LayerSharing]) -> list[str]:
    return [
        f"| {name} | {layer.layer} | {layer.blocks:.1f} | "
        + " | ".join(f"{layer.unions[size]:.1f}" for size in TILE_SIZES)
        + " |"
        for layer in layers
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="MLflow run id or checkpoint path")
    parser.add_argument("--text", type=Path, help="text to run on (default: the builtin corpus)")
    parser.add_argument("--windows", type=int, default=4, help="windows of data.seq_len tokens")
    parser.add_argument("--seed", type=int, default=0, help="seed of the untrained twin")
    args = parser.parse_args()
    loaded = load_run(args.run)
    trained = loaded.module.model.eval()
    tokenizer = run_tokenizer(loaded.cfg, trained.embed.num_embeddings)
    text = args.text.read_text(errors="replace") if args.text else "\n".join(builtin_documents())
    ids = torch.from_numpy(tokenizer.encode(text).astype("int64"))
    tokens = windows(ids, loaded.cfg.data.seq_len, args.windows)
    torch.manual_seed(args.seed)
    untrained = GQATransformer(loaded.cfg.model, loaded.cfg.attn, trained.embed.num_embeddings)
    print(
        f"{loaded.checkpoint} (step {loaded.global_step}), {args.windows} windows of "
        f"{loaded.cfg.data.seq_len} tokens; mean distinct blocks per tile of k positions\n"
    )
    sizes = " | ".join(f"k={k}" for k in TILE_SIZES)
    print(f"| model | layer | blocks per position | {sizes} |")
    print("|---" * (3 + len(TILE_SIZES)) + "|")
    for name, model in (("trained", trained), ("untrained", untrained.eval())):
        print("\n".join(table_rows(name, selection_sharing(model, tokens, TILE_SIZES))))


if __name__ == "__main__":
    main()
