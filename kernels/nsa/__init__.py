"""Native Sparse Attention ops (see ``docs/nsa.md``).

- :mod:`.spec`: the hyper-parameters and the GQA head layout every implementation shares.
- :mod:`.torch_ops`: the blockwise PyTorch implementation used for training.
- :mod:`.naive`: a slow, loop-based reference written independently, for tests only.
"""

from nsa_lab.kernels.nsa.naive import nsa_reference
from nsa_lab.kernels.nsa.spec import NSAParams
from nsa_lab.kernels.nsa.torch_ops import (
    causal_attention,
    compression_attention,
    compression_lse,
    nsa_attention,
    preferring_blocks,
    select_blocks,
    selected_blocks,
    selection_attention,
    selection_scores,
    sliding_window_attention,
)

__all__ = [
    "NSAParams",
    "causal_attention",
    "compression_attention",
    "compression_lse",
    "nsa_attention",
    "nsa_reference",
    "preferring_blocks",
    "select_blocks",
    "selected_blocks",
    "selection_attention",
    "selection_scores",
    "sliding_window_attention",
]
