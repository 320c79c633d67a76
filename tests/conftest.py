"""Shared test set-up: no test may reach a hub, and every test gets its own caches."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter. Set before anything
# imports triton (lightning and torch may), since Triton reads it once.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# On a GPU, one tile per kernel: tests at many small shapes compile each kernel once
# per shape instead of once per autotune candidate.
os.environ.setdefault("NSA_LAB_AUTOTUNE", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "experiments" / "smoke.yaml"


def assert_no_host_sync(step: Callable[[], None]) -> None:
    """Run ``step`` twice on a GPU, the second time raising on any host synchronisation
    (``torch.cuda.set_sync_debug_mode``); the first run may synchronise (autotuning)."""
    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A scratch cwd with its own HF cache, so runs leave nothing in the repo."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    return tmp_path
