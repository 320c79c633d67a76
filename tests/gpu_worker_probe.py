"""A stand-in sweep worker for the ``--gpus`` tests: records the GPUs it was given.

Kept free of heavy imports, so that a spawned process starts in well under a second.
"""

from __future__ import annotations

import os
from pathlib import Path


def record_visible_gpus(out: Path) -> None:
    """Write the ``CUDA_VISIBLE_DEVICES`` this process started with (``-`` if unset)."""
    out.write_text(os.environ.get("CUDA_VISIBLE_DEVICES", "-"))
