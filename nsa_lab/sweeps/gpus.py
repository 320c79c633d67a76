"""``nsa-lab sweep --gpus 0,1,2,3``: which GPU each sweep worker is pinned to.

A worker is pinned by starting its process with ``CUDA_VISIBLE_DEVICES`` set to one
GPU, so that it sees that GPU alone (as ``cuda:0``) from its first instruction and
Lightning's one-device trials land on it. Indices count the GPUs this process sees:
under ``CUDA_VISIBLE_DEVICES=4,5``, ``--gpus 1`` is physical GPU 5.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from nsa_lab.config import ConfigError

OPTION = "--gpus"


def visible_gpus() -> list[str] | None:
    """The ``CUDA_VISIBLE_DEVICES`` entry of each GPU this process sees, in index order;
    None when torch cannot count GPUs here (no CUDA), so indices cannot be checked."""
    import torch

    if not torch.cuda.is_available():
        return None
    count = torch.cuda.device_count()
    inherited = os.environ.get("CUDA_VISIBLE_DEVICES")
    if inherited:
        return [entry.strip() for entry in inherited.split(",")][:count]
    return [str(i) for i in range(count)]


def parse_gpus(text: str, visible: Sequence[str] | None) -> tuple[str, ...]:
    """``"0,2"`` -> the ``CUDA_VISIBLE_DEVICES`` value of each listed GPU, in order.

    Raises ConfigError naming ``--gpus`` for anything but distinct indices of GPUs in
    ``visible`` (any non-negative index when ``visible`` is None).
    """
    entries = [entry.strip() for entry in text.split(",")]
    if not all(entry.isdigit() for entry in entries):
        raise ConfigError(OPTION, text, "must be GPU indices separated by commas, e.g. 0,1,2,3")
    indices = [int(entry) for entry in entries]
    if len(set(indices)) != len(indices):
        raise ConfigError(OPTION, text, "lists a GPU twice; use --workers K for K workers a GPU")
    if visible is None:
        return tuple(str(i) for i in indices)
    beyond = [i for i in indices if i >= len(visible)]
    if beyond:
        raise ConfigError(
            OPTION, text, f"GPU {beyond[0]} does not exist: this machine shows {len(visible)}"
        )
    return tuple(visible[i] for i in indices)
